"""The README's Python example runs as written and prints what its comments say."""

import contextlib
import io

from conftest import ROOT


def test_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "README.md", "exec"), {})
    assert printed.getvalue().split("\n")[:3] == ["(2, 4, 8)", "[2, 0]", "1.5"]
