"""The evidence room: one observation window, one attribution rule, one immutable Evidence value."""
