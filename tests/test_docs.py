# The docs name only config keys, recipes and command-line options that exist, and name every one
# a user can set (a new config field or flag without a word in docs/ fails here).
import dataclasses
import re
from pathlib import Path

import pytest

from olavlm.cli import build_parser
from olavlm.config import Config, _hints
from olavlm.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SECTIONS = {name: tp for name, tp in _hints(Config).items() if dataclasses.is_dataclass(tp)}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _fields(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section]) if f.init]


def _sections_table() -> dict[str, str]:
    """docs/train.md's "### Sections" table: section -> its row."""
    text = _text(ROOT / "docs" / "train.md").split("### Sections", 1)[1].split("###", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = "|".join(cells[1:])
    return rows


def test_every_dotted_config_key_the_docs_name_is_a_field():
    """`optim.lr=...`, `teachers.synthetic.seed`, `data.path`: the first two parts must name a
    section and one of its fields (python attribute chains such as `model.lm_head` aside)."""
    bad, dotted = [], r"(?<![\w./-])(" + "|".join(SECTIONS) + r")\.(\w+)"
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", _text(doc)):
            for section, key in re.findall(dotted, span):
                if section == "model" and (doc.name == "model.md" or doc.parent.name == "ops"
                                           or key in ("safetensors", "fp16", "md")):
                    continue  # a python variable, checkpoint keys, file names there
                if key not in _fields(section) and key not in ("lrr",):  # (the typo example)
                    bad.append(f"{doc.name}: `{span}`")
    assert not bad, bad


def test_the_sections_table_names_every_config_field():
    rows = _sections_table()
    assert set(SECTIONS) <= set(rows), sorted(set(SECTIONS) - set(rows))
    missing = [f"{section}.{name}" for section in SECTIONS for name in _fields(section)
               if not re.search(rf"(?<![\w.]){name}(?!\w)", rows[section])]
    assert not missing, f"docs/train.md's Sections table does not name {missing}"


def test_recipes_the_docs_pass_exist():
    named = {m for doc in DOCS for m in re.findall(r"--recipe (\w+)", _text(doc))}
    named |= {m for doc in DOCS for m in re.findall(r"\brecipe=(\w+)", _text(doc))}
    assert named - {"NAME"} <= set(RECIPES), sorted(named - set(RECIPES) - {"NAME"})


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            yield from action.choices.items()


def _commands() -> dict[str, set[str]]:
    """"train" / "data synth" / ... -> the command's option strings."""
    out = {}
    for name, sub in _subparsers(build_parser()):
        nested = list(_subparsers(sub))
        for full, parser in ([(f"{name} {n}", p) for n, p in nested] or [(name, sub)]):
            out[full] = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    return out


def _doc_command_lines() -> list[tuple[str, str]]:
    """(command, the line's text) for each `olavlm ...` command line in the docs' shell blocks
    (continuation lines joined)."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", _text(doc), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                m = re.search(r"(?:^|\s)(?:olavlm|-m olavlm(?:\.train)?)\s+(.*)", line)
                if m is None:
                    continue
                words = m.group(1).split("#")[0].split()
                if "-m olavlm.train" in line:
                    words = ["train", *words]
                cmd = " ".join(words[:2]) if words[:1] in (["data"], ["targets"]) else words[0]
                found.append((cmd, " ".join(words)))
    return found


def test_options_in_the_docs_command_lines_exist():
    commands, bad, lines = _commands(), [], _doc_command_lines()
    assert len(lines) > 10, lines  # (the docs' command lines were found)
    for cmd, line in lines:
        assert cmd in commands, f"unknown command 'olavlm {cmd}' in the docs: {line}"
        bad += [f"olavlm {cmd}: {opt}" for opt in re.findall(r"(?<!\S)(--[a-z][\w-]*)", line)
                if opt not in commands[cmd]]
    assert not bad, bad


@pytest.mark.parametrize("cmd", sorted(_commands()))
def test_every_command_line_option_is_documented(cmd):
    text = "\n".join(_text(doc) for doc in DOCS)
    missing = [opt for opt in sorted(_commands()[cmd])
               if not re.search(re.escape(opt) + r"(?![\w-])", text)]
    assert not missing, f"olavlm {cmd}: options no doc names: {missing}"


def test_overrides_in_the_docs_shell_blocks_are_fields():
    found, bad = 0, []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", _text(doc), flags=re.S):
            for section, key in re.findall(r"(?<!\S)(\w+)\.(\w+)[.\w]*=", block):
                found += section in SECTIONS
                if section in SECTIONS and key not in _fields(section):
                    bad.append(f"{doc.name}: {section}.{key}")
    assert found > 10 and not bad, (found, bad)
