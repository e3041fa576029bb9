"""Every bad input of the README's table raises the error the table shows (tests/bad_inputs.py)."""
import pytest

from bad_inputs import cases, error_of


@pytest.mark.parametrize("case", cases(), ids=[c[0] for c in cases()])
def test_bad_input_gets_a_clear_error(case):
    error = error_of(case)
    assert case[3] in str(error)
