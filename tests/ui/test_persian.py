"""The web UI in Persian, in a real browser whose language is Persian (``Accept-Language:
fa-IR``): the first run (welcome, the admin account, a new network, where other PCs reach this
one), a chat answer, the login page and the certificate page it links to, every page of the
dashboard (the reports' charts mirrored, with Persian digits; a task run on a PC), each page
right-to-left with no English text of ours left on it; then the person switches to English
and the choice is kept. Screenshots at desktop and phone widths go to
``build/screenshots/fa-*.png``."""

from __future__ import annotations

import re
import socket

import pytest
from playwright.sync_api import expect

from tests.helpers.browser import shoot
from tests.ui.conftest import ui_base
from tests.ui.test_catalogs import marked_texts

pytestmark = pytest.mark.integration
PASSWORD = "correct horse"
ACCOUNT = "مدیر"  # a Persian account name

# Every text a person sees on the page: visible text nodes (a chart's SVG text too), and the
# placeholders, accessible names and tooltips; icons (their ligature names), what people wrote
# (questions, answers, titles), the nodes' own words (the event log, a task's output, log
# lines: tt-log), a Latin value shown alone (an address, a fingerprint: tt-value) and NiceGUI's
# hidden popups are not the UI's words.
PAGE_TEXTS = """() => {
  const skip = (el) => el.closest(
    '.q-icon, .material-icons, .tt-answer, .tt-user, .tt-log, .tt-value, script, style, ' +
    '[aria-hidden="true"]');
  const out = [document.title];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const text = walker.currentNode.textContent.trim();
    const el = walker.currentNode.parentElement;
    if (text && el && !skip(el) && el.checkVisibility()) out.push(text);
  }
  for (const el of document.querySelectorAll('[placeholder], [aria-label], [title]')) {
    if (skip(el) || !el.checkVisibility()) continue;
    for (const name of ['placeholder', 'aria-label', 'title']) {
      const value = el.getAttribute(name);
      if (value && value.trim()) out.push(value.trim());
    }
  }
  return out;
}"""


def _source_patterns() -> list[re.Pattern]:
    """Each English text of the UI as a pattern (its placeholders match anything)."""
    patterns = []
    for msgid, plural in marked_texts().items():
        for text in (msgid, plural):
            if text and re.search(r"[A-Za-z]{3}", re.sub(r"\{[^{}]*\}", "", text)):
                parts = re.split(r"\{[^{}]*\}", text)
                patterns.append(re.compile(".*".join(re.escape(p) for p in parts), re.S))
    return patterns


def untranslated(texts: list[str], allowed: set[str]) -> list[str]:
    """The texts that are one of the UI's English texts, or hold a Latin word of their own
    (not inside a value's isolate) that is not a name the person gave or a product's
    (``allowed``) nor an id (it has a digit)."""
    patterns = _source_patterns()
    left = []
    for text in texts:
        if any(p.fullmatch(text) for p in patterns):
            left.append(text)
            continue
        # a value given to a sentence (an id, a name, a CPU's model) is a bidi isolate in it
        own = re.sub("\u2068[^\u2069]*\u2069", "", text)
        words = re.findall(r"[A-Za-z][A-Za-z0-9_]*(?:[.:/-][A-Za-z0-9_]+)*", own)
        if [w for w in words if w not in allowed and not re.search(r"\d", w)]:
            left.append(text)
    return left


def assert_persian(page, allowed: set[str]) -> None:
    html = page.locator("html")
    expect(html).to_have_attribute("lang", "fa-IR")
    expect(html).to_have_attribute("dir", "rtl")
    page.wait_for_load_state("networkidle")
    left = untranslated(page.evaluate(PAGE_TEXTS), allowed)
    assert not left, f"English left on {page.url}: {left}"


# A Persian paragraph, an English one and a code block, as an answer's markdown is drawn: the
# chat's styles must run each paragraph in its own direction and keep code left-to-right.
MIXED = """(html) => {
  const box = document.createElement('div');
  box.className = 'tt-answer';
  box.setAttribute('dir', 'auto');
  box.style.width = '600px';
  box.innerHTML = html;
  document.querySelector('main, #app').appendChild(box);
  const edge = (p) => {
    const range = document.createRange();
    range.selectNodeContents(p);
    const text = range.getBoundingClientRect(), all = p.getBoundingClientRect();
    return {left: text.left - all.left, right: all.right - text.right};
  };
  const [fa, en] = box.querySelectorAll('p');
  const out = {fa: edge(fa), en: edge(en),
               code: getComputedStyle(box.querySelector('pre')).direction};
  box.remove();
  return out;
}"""
MIXED_HTML = (
    "<p>این یک پاسخ فارسی است با نام TikTrue در میانش.</p>"
    "<p>This paragraph is English.</p>"
    "<pre><code>print('hello')</code></pre>"
)


def assert_paragraphs_take_their_own_direction(page) -> None:
    edges = page.evaluate(MIXED, MIXED_HTML)
    assert edges["fa"]["right"] < 2 < edges["fa"]["left"], edges  # Persian: from the right
    assert edges["en"]["left"] < 2 < edges["en"]["right"], edges  # English: from the left
    assert edges["code"] == "ltr", edges


# Where a chart's parts are: its value axis' labels and its plot (an RTL chart is mirrored).
CHART_SIDES = """(figure) => {
  const box = (els) => {
    const rects = [...els].map((e) => e.getBoundingClientRect());
    return {left: Math.min(...rects.map((r) => r.left)),
            right: Math.max(...rects.map((r) => r.right))};
  };
  return {axis: box(figure.querySelectorAll('.axis.y text')),
          plot: box(figure.querySelectorAll('.plot .rect'))};
}"""


def assert_chart_reads_right_to_left(figure) -> None:
    """A Persian chart: its numbers in Persian digits, none in Latin ones (but in the ids, which
    are isolates), its value axis on the right of its bars (mirrored, as the page is)."""
    texts = figure.locator("svg text").all_text_contents()
    numbers = re.sub("\u2068[^\u2069]*\u2069", "", "".join(texts))
    assert re.search("[۰-۹]", numbers) and not re.search("[0-9]", numbers), texts
    sides = figure.evaluate(CHART_SIDES)
    assert sides["axis"]["left"] >= sides["plot"]["right"] - 1, sides


def test_first_run_and_a_chat_in_persian(ui_node, tiny_llama, new_page, tmp_path):
    cluster = ui_node(tmp_path / "pc1")  # a PC with the tiny model in its store
    base = ui_base(cluster)
    # names: the product, the model, its architecture, a protocol
    allowed = {"TikTrue", tiny_llama.model_id, "llama", "HTTPS"}
    page = new_page(locale="fa-IR")

    page.goto(base + "/")
    expect(page.get_by_text("به TikTrue خوش آمدید")).to_be_visible()
    assert_persian(page, allowed | {"admin"})  # the account name it offers
    shoot(page, "fa-welcome")
    page.get_by_label("نام حساب").fill(ACCOUNT)
    page.get_by_label("رمز عبور", exact=True).fill("short")
    page.get_by_label("تکرار رمز عبور").fill("short")
    page.get_by_role("button", name="ساخت حساب مدیر").click()
    expect(page.get_by_text("رمز عبور باید دست‌کم ۸ نویسه باشد.")).to_be_visible()
    page.get_by_label("رمز عبور", exact=True).fill(PASSWORD)
    page.get_by_label("تکرار رمز عبور").fill(PASSWORD)
    page.get_by_role("button", name="ساخت حساب مدیر").click()

    expect(page.get_by_text("راه‌اندازی این رایانه").first).to_be_visible()
    # where other PCs reach this one: here loopback only (a test PC), so it says so
    reach = page.locator('[data-panel="reach"]')
    expect(reach).to_contain_text("رایانه‌های دیگر به این رایانه دسترسی ندارند")
    expect(reach).to_contain_text("\u2068--local\u2069")
    assert_persian(page, allowed)
    shoot(page, "fa-setup")
    page.get_by_role("button", name="ساخت شبکهٔ تازه").click()
    expect(page.get_by_label("نام شبکه")).to_have_value("دفتر")
    assert_persian(page, allowed)
    shoot(page, "fa-create-network")
    page.get_by_role("button", name="ساخت شبکه", exact=True).click()
    # a name given to a sentence is a bidi isolate in it (FSI … PDI): it keeps its own order
    expect(page.get_by_text("شبکهٔ «\u2068دفتر\u2069» آماده است")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^([۰-۹]+) از \1 بلوک روی این رایانه$"))).to_be_visible()
    page.get_by_role("button", name="ساخت توکن پیوستن").click()
    expect(page.get_by_label("توکن یک‌بارمصرف پیوستن", exact=True)).not_to_be_empty()
    assert_persian(page, allowed)
    shoot(page, "fa-network-ready")

    page.get_by_role("button", name="رفتن به گفتگو").click()
    expect(page.get_by_text("چه کمکی از من برمی‌آید؟")).to_be_visible()
    assert_persian(page, allowed)
    page.get_by_label("پیام", exact=True).fill("سلام! TikTrue روی چند رایانه اجرا می‌شود؟")
    page.get_by_label("پیام", exact=True).press("Enter")
    figures = page.get_by_text(re.compile(r"[۰-۹]+٫[۰-۹] توکن بر ثانیه"))
    expect(figures).to_be_visible()  # the answer came, its figures in Persian digits
    expect(page.locator(".tt-answer").last).not_to_be_empty()
    expect(page.locator(".tt-user").last).to_have_attribute("dir", "auto")
    assert page.locator(".tt-user").last.evaluate("el => el.matches(':dir(rtl)')")
    assert_persian(page, allowed)
    assert_paragraphs_take_their_own_direction(page)
    shoot(page, "fa-chat")

    # the login page: Persian and right-to-left for a browser asking for fa
    page.get_by_role("button", name=f"حساب \u2068{ACCOUNT}\u2069").click()
    page.get_by_text("خروج", exact=True).click()
    expect(page.get_by_role("button", name="ورود")).to_be_visible()
    assert_persian(page, allowed)
    shoot(page, "fa-login")
    # the certificate page it links to (here: no certificate, the PC serves loopback only)
    page.get_by_role("link", name="گواهی این رایانه (HTTPS)").click()
    expect(page.get_by_text("اعتماد به گواهی HTTPS این رایانه")).to_be_visible()
    expect(page.get_by_text("حلقهٔ بازگشت").first).to_be_visible()
    assert_persian(page, allowed | {"HTTP"})
    shoot(page, "fa-trust")
    page.go_back()
    page.get_by_label("نام حساب").fill(ACCOUNT)
    page.get_by_label("رمز عبور", exact=True).fill("wrong password")
    page.get_by_role("button", name="ورود").click()
    expect(page.get_by_text("نام حساب یا رمز عبور درست نیست.")).to_be_visible()
    page.get_by_label("رمز عبور", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="ورود").click()
    expect(page.get_by_text("همین حالا")).to_be_visible()  # the conversation, in the list

    # the admin's dashboard, every page of it
    names = allowed | {socket.gethostname(), "embed", "head"}  # the PC's name, block names
    for path, shown, screenshot in (
        ("/admin", "نقشهٔ بلوک‌ها", "fa-admin-nodes"),
        ("/admin/plan", "جا می‌شود", "fa-admin-plan"),
        ("/admin/events", "گزارش رویدادها", "fa-admin-events"),
        ("/admin/reports", "گزارش کارایی", "fa-admin-reports"),
        ("/admin/tasks", "اجرای یک وظیفه", "fa-admin-tasks"),
        ("/admin/models", "مدل‌های این رایانه", "fa-admin-models"),
        ("/admin/people", "کلیدهای API", "fa-admin-people"),
    ):
        page.goto(base + path)
        expect(page.get_by_text(shown).first).to_be_visible()
        if path == "/admin":
            expect(page.get_by_text("سالم", exact=True)).to_be_visible()  # live health came
            reach = page.locator('[data-panel="reach"]')
            expect(reach).to_contain_text("رایانه‌های دیگر به این رایانه دسترسی ندارند")
        if path == "/admin/reports":  # the chat's answer, in charts and tables
            figure = page.get_by_role("figure", name="توکن‌های تولیدشده در هر شبکه")
            expect(figure.locator("svg")).to_be_visible()
            assert_chart_reads_right_to_left(figure)
            expect(page.get_by_text("مصرف هر حساب و کلید")).to_be_visible()
            row = page.get_by_role("row").filter(has_text=tiny_llama.model_id)
            expect(row.first).to_be_visible()
        if path == "/admin/tasks":  # a task on this PC: its status in Persian, kept in the list
            page.get_by_role("button", name="اجرا", exact=True).click()
            done = "\u2068disk_usage\u2069 روی \u2068[^\u2069]+\u2069: \u2068انجام شد\u2069"
            done = re.compile(f"^{done}$")
            expect(page.get_by_test_id("task-status")).to_have_text(done)
            row = page.get_by_role("row").filter(has_text="disk_usage")
            expect(row.first).to_contain_text("انجام شد")
            page.get_by_role("button", name="نمایش گزارش").click()
            expect(page.get_by_label("سطرهای گزارش").get_by_text("tiktrue").first).to_be_visible()
        if path == "/admin/events":  # the table's own pagination, in Persian digits too
            expect(page.get_by_text(re.compile(r"^[۰-۹]+–[۰-۹]+ از [۰-۹]+$"))).to_be_visible()
        assert_persian(page, names | {"API", "Hugging", "Face", "gguf", "config.json"})
        shoot(page, screenshot)

    # the person chooses English: kept for them (a reload and another page stay English)
    page.get_by_role("button", name=f"حساب \u2068{ACCOUNT}\u2069").click()
    page.get_by_text("English", exact=True).click()
    expect(page.get_by_text("API keys", exact=True)).to_be_visible()
    expect(page.locator("html")).to_have_attribute("dir", "ltr")
    page.goto(base + "/chat")
    expect(page.get_by_text("How can I help?")).to_be_visible()
    page.goto(base + "/setup")
    expect(page.get_by_text("Set up this PC").first).to_be_visible()
    assert_paragraphs_take_their_own_direction(page)  # also in a left-to-right page
