"""Every bad input of the README's table raises the error the table shows (tests/bad_inputs.py)."""
import pytest

from bad_inputs import cases, error_of


@pytest.mark.parametrize("case", cases(), ids=[c[0] for c in cases()])
def test_bad_input_gets_a_clear_error(case):
    error = error_of(case)
    assert case[3] in str(error)


def test_the_readme_table_is_what_the_code_says():
    """README.md's "Bad input and what you get" table equals the one bad_inputs.py prints now."""
    import os

    from bad_inputs import table

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    assert table() in readme, "regenerate the README table: cd tests && python bad_inputs.py"
