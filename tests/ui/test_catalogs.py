"""The translations are complete and compile: every text marked in ``src/tiktrue/ui`` has a
Persian translation (not fuzzy, the same placeholders), and the shipped ``.mo`` is what the
``.po`` compiles to (``make i18n`` was run after the last change)."""

from __future__ import annotations

import ast
import gettext
import io
import re
from pathlib import Path

import pytest
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

import tiktrue.ui
from tiktrue.ui import i18n

UI = Path(tiktrue.ui.__file__).parent
KEYWORDS = {**DEFAULT_KEYWORDS, "N_": None, "Nn_": (1, 2)}  # as `make i18n` extracts
FIELD = re.compile(r"\{([^{}:!]*)[^{}]*\}")
TRANSLATED = [code for code in i18n.LANGUAGES if code != i18n.SOURCE.code]


def marked_texts() -> dict[str, str | None]:
    """msgid -> its plural (None: none) of every text marked in the UI's code."""
    found = {}
    for filename, _line, message, _comments, _context in extract_from_dir(
        str(UI), keywords=KEYWORDS
    ):
        if isinstance(message, tuple):
            found[message[0]] = message[1]
        elif message:
            found[message] = None
        assert message, f"{filename}: a marked text that is not a plain string literal"
    return found


def po_path(code: str) -> Path:
    return i18n.LOCALES / code / "LC_MESSAGES" / f"{i18n.DOMAIN}.po"


def read(code: str):
    with po_path(code).open("rb") as source:
        return read_po(source, locale=code)


def fields(text: str) -> set[str]:
    return set(FIELD.findall(text))


def test_the_ui_marks_its_texts():
    texts = marked_texts()
    assert len(texts) > 50, "the extraction found (almost) nothing"
    assert "Log in" in texts


@pytest.mark.parametrize("code", TRANSLATED)
def test_every_text_has_a_translation_with_the_same_placeholders(code):
    catalog = read(code)
    problems = []
    for msgid, plural in marked_texts().items():
        message = catalog.get(msgid)
        if message is None:
            problems.append(f"not in the catalog (run `make i18n`): {msgid!r}")
            continue
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        if message.fuzzy or not all(strings):
            problems.append(f"not translated{' (fuzzy)' * message.fuzzy}: {msgid!r}")
            continue
        wanted = fields(msgid) | fields(plural or "")
        for text in strings:
            if fields(text) - wanted or fields(msgid) - fields(text) - {"n"}:
                problems.append(f"other placeholders: {msgid!r} -> {text!r}")
            if '"' in text and '"' not in msgid:  # the pages put texts into "…" attributes
                problems.append(f'a " in the translation: {msgid!r} -> {text!r}')
    for message, errors in catalog.check():  # Babel's own checks, as `make i18n` runs them
        problems += [f"{message.id!r}: {error}" for error in errors]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("code", TRANSLATED)
def test_the_shipped_catalog_is_the_compiled_po(code):
    catalog = read(code)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    fresh = gettext.GNUTranslations(compiled)
    shipped = i18n.catalog(code)
    assert isinstance(shipped, gettext.GNUTranslations)
    assert shipped._catalog == fresh._catalog, "the .mo is stale: run `make i18n`"  # noqa: SLF001


def test_the_check_sees_an_untranslated_text(tmp_path, monkeypatch):
    """The completeness check fails when a text is left empty (a test that can fail)."""
    source = po_path("fa").read_text("utf-8")
    broken = source.replace('msgstr "گفتگو"', 'msgstr ""', 1)
    assert broken != source
    target = tmp_path / "fa" / "LC_MESSAGES"
    target.mkdir(parents=True)
    (target / f"{i18n.DOMAIN}.po").write_text(broken, "utf-8")
    monkeypatch.setattr(i18n, "LOCALES", tmp_path)
    with pytest.raises(AssertionError, match="not translated: 'Chat'"):
        test_every_text_has_a_translation_with_the_same_placeholders("fa")


def test_no_code_hides_the_translation_function():
    """A module that translates with ``_`` never binds ``_`` itself (``for _ in``, ``*_``,
    ``a, _ = ``): in that function ``_("…")`` would call the wrong thing."""
    hidden = []
    for path in sorted(UI.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        imports_it = any(
            isinstance(node, ast.ImportFrom) and any(a.name == "_" for a in node.names)
            for node in ast.walk(tree)
        )
        if not imports_it:
            continue
        for node in ast.walk(tree):
            stored = isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
            if (stored and node.id == "_") or (isinstance(node, ast.arg) and node.arg == "_"):
                hidden.append(f"{path.name}:{node.lineno}")
    assert not hidden, f"these bind _ (rename them): {hidden}"
