"""The UI's languages without a browser: which language a browser gets, texts in it, and its
numbers and dates (Persian digits and the Solar Hijri calendar; ids stay Latin)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tiktrue.ui import i18n
from tiktrue.ui.i18n import N_, PERSIAN, SOURCE, Nn_, _, ngettext, using


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("fa", "fa"),
        ("fa-IR,fa;q=0.9,en-US;q=0.8,en;q=0.7", "fa"),
        ("en-US,en;q=0.9,fa;q=0.8", "en"),
        ("de-DE, fa;q=0.5, en;q=0.4", "fa"),  # the first of ours by quality
        ("en;q=0.4, fa_IR;q=0.6", "fa"),
        ("fa;q=0, en", "en"),  # q=0: not wanted
        ("fa;q=abc, en;q=0.1", "en"),  # a broken quality counts as not wanted
        ("de, ja", "en"),
        ("*", "en"),
        ("", "en"),
        (None, "en"),
    ],
)
def test_a_browser_gets_the_first_of_our_languages_it_asks_for(header, code):
    assert i18n.negotiate(header).code == code


def test_texts_numbers_and_names_in_persian():
    with using(PERSIAN):
        assert _("Chat") == "گفتگو"
        # a name stays as it is, isolated from the Persian around it (FSI … PDI)
        assert _("Account {name}", name="admin42") == "حساب \u2068admin42\u2069"
        assert i18n.fmt_bytes(1_234_567_890) == "۱٫۲ گیگابایت"
        assert i18n.fmt_bytes(113_000_000) == "۱۱۳ مگابایت"
        assert i18n.fmt_bytes(None) == "?"
        assert i18n.number(1234.5, ",.1f") == "۱٬۲۳۴٫۵"
    assert _("Chat") == "Chat"  # English outside
    assert i18n.fmt_bytes(1_234_567_890) == "1.2 GB"
    assert i18n.number(1234.5, ",.1f") == "1,234.5"


def test_a_message_made_for_nobody_is_translated_where_it_is_shown():
    step = N_("{what} copied", what="Admin address")
    assert step == "Admin address copied"  # its English, as the JSON API gives it
    assert json.dumps({"step": step}) == '{"step": "Admin address copied"}'
    with using(PERSIAN):
        assert i18n.translate(step) == "\u2068Admin address\u2069 کپی شد"
        assert i18n.translate("a lower layer's words") == "a lower layer's words"
        assert i18n.translate(None) == ""
    assert i18n.translate(step) == "Admin address copied"


def test_counts_and_plurals():
    many = Nn_("{count} block", "{count} blocks", 3, count=3)
    assert many == "3 blocks"
    assert ngettext("{count} block", "{count} blocks", 1, count=1) == "1 block"


def test_numbers_given_to_a_text_take_the_language_digits_text_values_do_not():
    with using(PERSIAN):
        text = i18n.translate(N_("{n} GB", n=2.5))
        assert text == "۲٫۵ گیگابایت"
        assert i18n.translate(N_("{n} GB", n="v2.5")) == "\u2068v2.5\u2069 گیگابایت"
        assert i18n.translate(N_("{n} GB", n=True)) == "\u2068True\u2069 گیگابایت"  # no number


def test_dates_in_the_persian_calendar():
    noon = dt.datetime(2026, 12, 1, 12, 30, 5).timestamp()  # local time, as shown
    with using(PERSIAN):
        assert i18n.fmt_date(noon) == "۱۰ آذر ۱۴۰۵"
        assert i18n.fmt_datetime(noon) == "۱۴۰۵/۰۹/۱۰ ۱۲:۳۰:۰۵"
        assert i18n.fmt_ago(300) == "۵ دقیقه پیش"
        assert i18n.fmt_ago(2 * 3600) == "۲ ساعت پیش"
    assert i18n.fmt_date(noon) == "2026-12-01"
    assert i18n.fmt_datetime(noon) == "2026-12-01 12:30:05"
    assert i18n.fmt_ago(300) == "5 minutes ago"


def test_languages():
    assert i18n.language("fa-IR") is PERSIAN and i18n.language("EN_us") is SOURCE
    assert i18n.language("de") is None and i18n.language("") is None
    assert PERSIAN.direction == "rtl" and SOURCE.direction == "ltr"
    assert i18n.current() is SOURCE  # no page, nothing chosen


def test_the_terminal_chat_speaks_persian_only_when_asked(monkeypatch):
    from tiktrue.ui.terminal_chat import terminal_language

    for name in ("TIKTRUE_LANG", "LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(name, raising=False)
    assert terminal_language() is SOURCE  # e.g. the Windows console: no locale variables
    assert terminal_language("fa") is PERSIAN
    monkeypatch.setenv("LANG", "fa_IR.UTF-8")
    assert terminal_language() is PERSIAN
    monkeypatch.setenv("TIKTRUE_LANG", "en")
    assert terminal_language() is SOURCE
    monkeypatch.setenv("TIKTRUE_LANG", "de")
    assert terminal_language() is SOURCE
    with using(PERSIAN):
        assert _("(stopped)") == "(متوقف شد)"
