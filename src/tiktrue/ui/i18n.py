"""The languages of the UI: English (the source) and Persian (right-to-left).

Texts are marked in the code with ``_("…")`` (translated at once, in the language of the
person the code runs for), ``ngettext`` (a count), and ``N_("…")`` / ``Nn_`` (translated
later: a :class:`Message` made where no person is known yet, such as a background job's
step, and shown by a page through :func:`translate`). Placeholders are ``str.format``
fields given as keyword arguments, so one catalog entry holds the whole sentence and its
word order is the translator's: ``_("{free} free of {total}", free=…, total=…)``.

The catalogs are GNU gettext's (``locales/<lang>/LC_MESSAGES/tiktrue.po``, compiled to
``.mo``; stdlib :mod:`gettext` reads them); Babel extracts the texts from the code and
compiles the catalogs (``make i18n``), and gives the locale's number symbols (CLDR).

Numbers follow the language: a number given as a placeholder is written with the language's
digits and separators (Persian: ``۱٬۲۳۴٫۵``), while text placeholders stay as they are:
model ids, addresses, node ids, tokens and code keep their Latin letters and digits. Dates
are the language's calendar (Persian: the Solar Hijri calendar, by ``jdatetime``).

Whose language: the web UI asks :func:`current`, which is the language of the browser
being served (the one the person chose, kept in their storage like the chat settings, else
the browser's ``Accept-Language``); code that runs for nobody in particular (the terminal
chat, a test) sets one with :func:`using`.
"""

from __future__ import annotations

import datetime as dt
import gettext
import string
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DOMAIN = "tiktrue"
LOCALES = Path(__file__).parent / "locales"
LANGUAGE_KEY = "tiktrue_language"  # the person's choice, in their storage (as chat settings)
_CLIENT_KEY = "tiktrue_language"  # the language resolved for one open page (its client)


@dataclass(frozen=True)
class Language:
    """One language of the UI."""

    code: str  # gettext and CLDR locale: "en", "fa"
    name: str  # in itself, for the language switch: "English", "فارسی"
    quasar: str  # Quasar's language pack (its own labels, the <html lang>, RTL): "fa-IR"
    rtl: bool = False
    digits: str = "0123456789"  # how the language writes 0..9
    persian_calendar: bool = False

    @property
    def direction(self) -> str:
        return "rtl" if self.rtl else "ltr"


SOURCE = Language("en", "English", "en-US")
PERSIAN = Language("fa", "فارسی", "fa-IR", rtl=True, digits="۰۱۲۳۴۵۶۷۸۹", persian_calendar=True)
LANGUAGES = {language.code: language for language in (SOURCE, PERSIAN)}

_chosen: ContextVar[Language | None] = ContextVar("tiktrue_language", default=None)


def language(code: str | None) -> Language | None:
    """The UI language for a code such as ``fa``, ``fa-IR`` or ``en_US`` (None: not one)."""
    if not code:
        return None
    return LANGUAGES.get(code.replace("_", "-").split("-")[0].strip().lower())


def negotiate(accept_language: str | None) -> Language:
    """The language a browser asks for first among ours (``Accept-Language``, with its
    q-values); English when it asks for none of them."""
    wanted = []
    for position, part in enumerate((accept_language or "").split(",")):
        tag, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if tag and quality > 0:
            wanted.append((-quality, position, tag))
    for _quality, _position, tag in sorted(wanted):
        found = language(tag)
        if found is not None:
            return found
    return SOURCE


@cache
def catalog(code: str) -> gettext.NullTranslations:
    """The compiled catalog of a language (the source language has none)."""
    if code == SOURCE.code:
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, LOCALES, [code])


@contextmanager
def using(chosen: Language) -> Iterator[Language]:
    """Texts made inside (in this task and the tasks it starts) are in ``chosen``."""
    token = _chosen.set(chosen)
    try:
        yield chosen
    finally:
        _chosen.reset(token)


def current() -> Language:
    """The language of the code running now: one set by :func:`using`, else that of the
    web page being served or acted on, else English."""
    chosen = _chosen.get()
    if chosen is not None:
        return chosen
    return _page_language() or SOURCE


def _page_language() -> Language | None:
    """The language of the NiceGUI client whose page or event runs now, resolved once per
    client: the person's choice, else the browser's ``Accept-Language``."""
    if "nicegui" not in sys.modules:  # the admin operations also run without any UI
        return None
    from nicegui import context

    try:
        client = context.client
    except RuntimeError:  # a background task: nobody's page
        return None
    found = language(client.storage.get(_CLIENT_KEY))
    if found is None:
        found = chosen_language()
        if found is None:
            try:
                request = client.request
            except RuntimeError:  # NiceGUI's client of no request (code outside any page)
                return None
            found = negotiate(request.headers.get("accept-language") if request else None)
        client.storage[_CLIENT_KEY] = found.code
    return found


def chosen_language() -> Language | None:
    """The language this browser's person chose (None: they did not choose)."""
    from nicegui import app

    try:
        return language(app.storage.user.get(LANGUAGE_KEY))
    except (RuntimeError, AssertionError, KeyError):  # no user storage for this request
        return None


def choose(chosen: Language) -> None:
    """Keep ``chosen`` as this browser's language (the page shows it after a reload)."""
    from nicegui import app, context

    app.storage.user[LANGUAGE_KEY] = chosen.code
    context.client.storage[_CLIENT_KEY] = chosen.code


# --- texts -----------------------------------------------------------------------------------


def _(msgid: str, /, **params: object) -> str:
    """``msgid`` in the current language, its ``{placeholders}`` filled from ``params``."""
    return _render(current(), msgid, None, None, params)


def ngettext(singular: str, plural: str, n: int, /, **params: object) -> str:
    """The singular or plural text for ``n`` (also given to the text as ``{n}``)."""
    return _render(current(), singular, plural, n, params)


class Message(str):
    """A text to translate where it is shown: it reads as its English, and keeps its
    ``msgid`` and ``params`` so :func:`translate` can write it in the viewer's language.
    (A job's step is made in a task that serves nobody; a page reads it for someone.)"""

    msgid: str
    plural: str | None
    n: int | None
    params: dict

    def __new__(
        cls, msgid: str, params: dict, plural: str | None = None, n: int | None = None
    ) -> Message:
        text = super().__new__(cls, _render(SOURCE, msgid, plural, n, params))
        text.msgid, text.plural, text.n, text.params = msgid, plural, n, params
        return text


def N_(msgid: str, /, **params: object) -> Message:  # noqa: N802 (gettext's name)
    """``msgid`` marked for translation, translated by :func:`translate` where shown."""
    return Message(msgid, params)


def Nn_(singular: str, plural: str, n: int, /, **params: object) -> Message:  # noqa: N802
    """A singular/plural text marked for translation (see :func:`N_`)."""
    return Message(singular, params, plural, n)


def translate(text: object) -> str:
    """A :class:`Message` in the current language; any other text as it is (a message from
    below the UI that has no translation: a lower layer's own words)."""
    if isinstance(text, Message):
        return _render(current(), text.msgid, text.plural, text.n, text.params)
    return "" if text is None else str(text)


def _render(lang: Language, msgid: str, plural: str | None, n: int | None, params: dict) -> str:
    book = catalog(lang.code)
    if plural is None:
        text = book.gettext(msgid)
    else:
        text = book.ngettext(msgid, plural, n)
        params = {"n": n, **params}
    return _Formatter(lang).format(text, **params) if params else text


FIRST_STRONG_ISOLATE, POP_ISOLATE = "\u2068", "\u2069"


def isolate(text: str) -> str:
    """``text`` as a bidi isolate: laid out in its own direction, not mixed with its
    neighbours' (a Latin model id beside Persian words and digits)."""
    return f"{FIRST_STRONG_ISOLATE}{text}{POP_ISOLATE}" if text else text


def latin(text: str) -> str:
    """A Latin value shown by itself (an id in a table's cell, a chart's label) in the current
    language: a bidi isolate in a right-to-left one (as a placeholder's value is), as it is in
    a left-to-right one."""
    return isolate(text) if current().rtl else text


class _Formatter(string.Formatter):
    """``str.format`` whose numbers come out in the language's digits and separators, and
    whose :class:`Message` values are translated; other values are written as they are. In
    a right-to-left language a text value is a bidi isolate (FSI … PDI): an id such as
    ``tiny-llama (llama, …`` keeps its own order and does not drag the Persian words and
    the punctuation around it into left-to-right."""

    def __init__(self, lang: Language) -> None:
        self.lang = lang

    def format_field(self, value: object, format_spec: str) -> str:
        if isinstance(value, Message):
            return _render(self.lang, value.msgid, value.plural, value.n, value.params)
        if isinstance(value, Bytes):
            return _fmt_bytes(value, self.lang)
        text = format(value, format_spec)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return localize_digits(text, self.lang)
        return isolate(text) if self.lang.rtl else text


# --- numbers and dates -----------------------------------------------------------------------


@cache
def _number_table(code: str) -> dict[int, str]:
    lang = LANGUAGES[code]
    table = str.maketrans("0123456789", lang.digits)
    if lang.digits != SOURCE.digits:  # the separators of the language's own digits (CLDR)
        from babel.numbers import get_decimal_symbol, get_group_symbol

        system = "arabext" if code == "fa" else "default"
        table[ord(".")] = get_decimal_symbol(code, numbering_system=system)
        table[ord(",")] = get_group_symbol(code, numbering_system=system)
    return table


def localize_digits(text: str, lang: Language | None = None) -> str:
    """A number written by Python (``1,234.5``) in the language's way (``۱٬۲۳۴٫۵``)."""
    lang = lang or current()
    return text if lang is SOURCE else text.translate(_number_table(lang.code))


def number(value: float, spec: str = "") -> str:
    """``value`` formatted by ``spec`` (``format``'s), in the current language."""
    return localize_digits(format(value, spec))


_BYTE_UNITS = {
    "B": N_("{n} B"),
    "KB": N_("{n} KB"),
    "MB": N_("{n} MB"),
    "GB": N_("{n} GB"),
    "TB": N_("{n} TB"),
    "PB": N_("{n} PB"),
}


class Bytes(int):
    """A size given to a text: written as :func:`fmt_bytes` writes it, in the language the
    text is shown in (``N_("… {size}", size=Bytes(n))``)."""


def fmt_bytes(count: float | None) -> str:
    """``1.2 GB`` in the current language (``۱٫۲ گیگابایت``); ``?`` when unknown."""
    return "?" if count is None else _fmt_bytes(count, current())


def _fmt_bytes(count: float, lang: Language) -> str:
    from tiktrue.control.planner import human_bytes  # the one way sizes are written

    return size_text(human_bytes(count), lang)


def size_text(written: str, lang: Language | None = None) -> str:
    """A size as ``human_bytes`` writes it (``"1.2 GB"``) in the language."""
    figure, unit = written.split(" ")
    n = float(figure) if "." in figure else int(figure)
    return _render(lang or current(), _BYTE_UNITS[unit].msgid, None, None, {"n": n})


def _moment(when: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(when)


def fmt_datetime(when: float) -> str:
    """A moment as a person reads it: ``2026-12-01 14:03:22``, ``۱۴۰۵/۰۹/۱۰ ۱۴:۰۳:۲۲``."""
    lang = current()
    moment = _moment(when)
    if lang.persian_calendar:
        import jdatetime

        text = jdatetime.datetime.fromgregorian(datetime=moment).strftime("%Y/%m/%d %H:%M:%S")
        return localize_digits(text, lang)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def fmt_date(when: float) -> str:
    """A day: ``2026-12-01``, ``۱۰ آذر ۱۴۰۵`` (the Solar Hijri calendar, month by name)."""
    lang = current()
    moment = _moment(when)
    if lang.persian_calendar:
        import jdatetime

        day = jdatetime.date.fromgregorian(date=moment.date(), locale="fa_IR")
        return localize_digits(f"{day.day} {day.strftime('%B')} {day.year}", lang)
    return moment.strftime("%Y-%m-%d")


def fmt_ago(seconds: float) -> str:
    """How long ago, in words (``5 minutes ago``, ``۵ دقیقه پیش``): CLDR's units (Babel)."""
    from babel.dates import format_timedelta

    lang = current()
    text = format_timedelta(
        dt.timedelta(seconds=-max(0.0, seconds)),
        add_direction=True,
        threshold=1,
        locale=lang.code,
    )
    return localize_digits(text, lang)
