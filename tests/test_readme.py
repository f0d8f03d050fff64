"""The README's Python example runs as written, against a packed quantized checkpoint placed
where the demo leaves its own (checkpoints/demo/finetune/best.pt, relative to the working
folder)."""
import os
import re

from tiny_checkpoints import make_checkpoint, write_tiny_data

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_example():
    """The first ```python block of the "Use it from Python" section."""
    with open(README) as f:
        text = f.read()
    section = text[text.index("## Use it from Python"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_on_a_packed_checkpoint(tmp_path, monkeypatch, capsys):
    data = write_tiny_data(tmp_path / "data", tasks=("partseg",))
    monkeypatch.chdir(tmp_path)
    make_checkpoint(os.path.join("checkpoints", "demo", "finetune", "best.pt"), "partseg", data,
                    packed=True)
    capsys.readouterr()
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert printed.startswith("pt_seg_tiny partseg ") and "per-layer bits: {" in printed
