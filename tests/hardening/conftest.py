"""The corpus holds malformed lab files on purpose: test_corpus.py reads them, pytest must not collect them.

(labctl's pytest plugin turns every lab file it meets into test items.)
"""

collect_ignore = ["corpus"]
