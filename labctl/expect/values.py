"""Value types expectations and check steps share (addresses), kept free of any kernel knowledge."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import AfterValidator


def check_address(value: str) -> str:
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (lab traffic goes to lab addresses only)") from None
    return value


Address = Annotated[str, AfterValidator(check_address)]
