"""Research that explains a result of sd_scratch but is not part of the library (not installed).

Run from the repository root, e.g. `python -m experiments.lms_and_pndm.exact_model`; the tests run
with the rest (`python -m pytest`).
"""
