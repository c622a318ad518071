"""What the README, the agent skill and `clawrouter models` say agrees with the code: the
retired model names (the catalog is the truth) and the fields an error envelope may carry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from clawrouter import catalog
from clawrouter.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SKILL = (ROOT / "skills" / "imagegen" / "SKILL.md").read_text()
RETIRED = [*catalog.RENAMED, *catalog.DROPPED]
LIVE = {name for m in catalog.MODELS for name in (m.id, m.id.split("/")[1], *m.aliases)}


def paragraph(text: str, marker: str) -> str:
    found = [p for p in text.split("\n\n") if marker in p]
    assert len(found) == 1, marker
    return found[0]


def named(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w-]|\.\w)", text) is not None


@pytest.mark.parametrize("where", ["README", "SKILL"])
def test_the_docs_list_every_retired_name_and_no_other(where: str) -> None:
    text = paragraph(README if where == "README" else SKILL, "Retired names")
    for name in RETIRED:
        assert f"`{name}`" in text, name
    for quoted in re.findall(r"`([^`]+)`", text):
        assert (quoted in RETIRED or quoted in LIVE or quoted == "model_dropped"
                or re.fullmatch(r"\d+x\d+", quoted)), f"{quoted}: not in the catalog"
    target = catalog.RENAMED["dall-e-3"]
    for old, new in target.sizes.items():
        assert old in text and new in text


def test_clawrouter_models_lists_every_retired_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in RETIRED:
        assert named(out, name), name
    for old, new in catalog.RENAMED["dall-e-3"].sizes.items():
        assert f"{old} → {new}" in out


def extra_fields() -> set[str]:
    """The keys any error adds to the envelope (`extra=` on a ClawError), read from the code."""
    keys: set[str] = set()
    for path in (ROOT / "clawrouter").rglob("*.py"):
        if "sandbox" in path.parts:  # the upstream stand-in's errors are BlockRun's shape
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.keyword) and node.arg == "extra"
                    and isinstance(node.value, ast.Dict)):
                keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            if isinstance(node, ast.Assign):
                keys |= {t.slice.value for t in node.targets
                         if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute)
                         and t.value.attr == "extra" and isinstance(t.slice, ast.Constant)}
    return keys


def test_the_readme_names_every_field_an_error_adds_to_the_envelope() -> None:
    """"Every error is the four-field envelope" is true only with the fields some add."""
    text = paragraph(README, "Every error, everywhere")
    fields = extra_fields()
    assert {"payment", "window", "limit_usd", "remaining_usd", "requested_usd"} <= fields
    for name in fields:
        assert f"`{name}`" in text, name
    for always in ("message", "type", "param", "code"):
        assert f'"{always}"' in text
