"""``/admin/models``: the models in this PC's block store; import a Hugging Face folder or a
GGUF file on this PC, download one from a model repository, verify one, each with a progress
bar."""

from __future__ import annotations

from nicegui import ui

from tiktrue.model.errors import StoreError
from tiktrue.model.quant import WEIGHT_FORMATS
from tiktrue.model.sampling import SamplingDefaults
from tiktrue.model.store import BlockStore, list_stores
from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.admin.widgets import (
    WIDE,
    admin_frame,
    attempt,
    data_table,
    fmt_bytes,
    follow_job,
    js_name,
    row_button,
    section,
)
from tiktrue.ui.i18n import N_, _, number, translate

COLUMNS = [
    {"name": "model_id", "label": N_("Model"), "field": "model_id", "align": "left"},
    {
        "name": "architecture",
        "label": N_("Architecture"),
        "field": "architecture",
        "align": "left",
        **WIDE,
    },
    {"name": "layers", "label": N_("Layers"), "field": "layers", **WIDE},
    {"name": "format", "label": N_("Weights"), "field": "format", "align": "left"},
    {"name": "size", "label": N_("Size"), "field": "size"},
    {"name": "networks", "label": N_("Used by"), "field": "networks", "align": "left", **WIDE},
    {"name": "actions", "label": "", "field": "model_id"},
]


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/models")
    def models_page(network: str | None = None) -> None:
        with admin_frame("models", network) as allowed:
            if not allowed:
                return
            section(_("Models on this PC"))
            table = data_table(COLUMNS, "model_id", _("No model on this PC yet"))
            row_button(
                table,
                "verify",
                label=_("Verify"),
                icon="verified",
                aria=js_name(_("Verify"), "model_id"),
                arg="props.row.model_id",
            )
            jobs = ui.column().classes("w-full gap-3")

            def refresh() -> None:
                rows = []
                for m in ops.models():
                    if m.get("model_id") is None:
                        continue
                    rows.append(
                        {
                            **m,
                            "size": fmt_bytes(m["bytes"]),
                            "layers": number(m["layers"]),
                            "networks": ", ".join(m["networks"]) or "-",
                        }
                    )
                table.update_rows(rows)

            async def launch(start_job) -> None:
                """Start a job (a refusal is shown) and follow it under the forms."""
                job = await attempt(start_job)
                if job is not None:
                    with jobs:
                        holder = ui.column().classes("tt-card w-full p-3")
                    follow_job(job, holder, lambda _job: refresh())

            async def verify(event) -> None:
                await launch(lambda: ops.verify_model(event.args))

            table.on("verify", verify)

            with ui.element("div").classes("tt-grid"):
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label(_("Import a model file or folder")).classes("font-semibold")
                    ui.label(
                        _(
                            "A Hugging Face folder ({files}) or a {gguf} file on this PC.",
                            files="config.json + safetensors",
                            gguf=".gguf",
                        )
                    ).classes("tt-muted text-sm")
                    path = ui.input(_("Path on this PC")).props("outlined dense").classes("tt-ltr")
                    model_id = ui.input(_("Model id")).props("outlined dense").classes("tt-ltr")
                    dtype = ui.select(
                        {"": _("as it comes"), **{f: f for f in WEIGHT_FORMATS}},
                        label=_("Weight format"),
                        value="",
                    ).props("outlined dense")

                    def do_import():
                        return launch(
                            lambda: ops.import_model(
                                path.value.strip(), model_id.value.strip(), dtype.value or None
                            )
                        )

                    label = _("Import")
                    ui.button(label, icon="upload_file", on_click=do_import).props(
                        f'unelevated no-caps aria-label="{label}"'
                    )
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label(_("Download from a model repository")).classes("font-semibold")
                    ui.label(
                        _(
                            "A PC of the LAN serving models ({command}), e.g. {example}. Resumes "
                            "after an interruption.",
                            command="tiktrue models serve",
                            example="http://192.168.1.20:8765",
                        )
                    ).classes("tt-muted text-sm")
                    source = ui.input(_("Repository URL")).props("outlined dense").classes("tt-ltr")
                    wanted = ui.input(_("Model id")).props("outlined dense").classes("tt-ltr")

                    def do_download():
                        return launch(
                            lambda: ops.download_model(wanted.value.strip(), source.value.strip())
                        )

                    label = _("Download")
                    ui.button(label, icon="download", on_click=do_download).props(
                        f'unelevated no-caps aria-label="{label}"'
                    )
            sampling_defaults(ops)
            refresh()


FIELDS = {  # setting -> (label, what turns it off)
    "temperature": (N_("Temperature"), N_("0 = greedy")),
    "top_k": (N_("Top k"), N_("0 = off")),
    "top_p": (N_("Top p"), N_("1 = off")),
    "min_p": (N_("Min p"), N_("0 = off")),
    "repetition_penalty": (N_("Repetition penalty"), N_("1 = off")),
}


def sampling_defaults(ops: AdminOperations) -> None:
    """Per model: what a request, the web chat or the terminal leave out. The model's own
    settings (its generation_config.json, a GGUF's metadata) unless set here; kept on this PC
    (``sampling.json`` in the model's store), read by this PC's gateway at the next request."""
    stores = {s.model_id: s for s in list_stores(ops.models_root) if isinstance(s, BlockStore)}
    section(_("Sampling defaults"))
    with ui.column().classes("tt-card p-4 gap-2 w-full"):
        ui.label(
            _(
                "What a request or the chat leaves out. Each model starts from its own "
                "recommended settings; set others here for this PC's gateway."
            )
        ).classes("tt-muted text-sm")
        if not stores:
            ui.label(_("No model on this PC yet")).classes("tt-muted text-sm")
            return
        chosen = ui.select(list(stores), label=_("Model"), value=next(iter(stores)))
        which = _("Model for sampling defaults")
        chosen.props(f'outlined dense aria-label="{which}"')
        inputs = {
            name: ui.number(f"{translate(label)} ({translate(off)})").props(
                f'outlined dense aria-label="{translate(label)}"'
            )
            for name, (label, off) in FIELDS.items()
        }
        where = ui.label("").classes("tt-muted text-sm")

        def show() -> None:
            store = stores[chosen.value]
            defaults, set_here = store.sampling_defaults(), store.admin_sampling()
            for name, field in inputs.items():
                field.set_value(getattr(defaults, name))
            where.set_text(
                _("Set here: {names}.", names=", ".join(translate(FIELDS[n][0]) for n in set_here))
                if set_here
                else _("These are the model's own settings.")
            )

        def save(values: dict | None) -> None:
            try:
                stores[chosen.value].set_admin_sampling(values)
            except StoreError as exc:
                ui.notify(str(exc), type="negative", multi_line=True, close_button=_("OK"))
                return
            show()
            ui.notify(_("Saved: the next requests use these settings."), type="positive")

        def save_changed() -> None:
            store = stores[chosen.value]
            own = SamplingDefaults(**store.model_sampling())
            values = {
                name: field.value
                for name, field in inputs.items()
                if field.value is not None and field.value != getattr(own, name)
            }
            save(values)

        chosen.on_value_change(lambda _event: show())
        with ui.row().classes("gap-2"):
            save_label = _("Save sampling defaults")
            ui.button(_("Save"), icon="save", on_click=save_changed).props(
                f'unelevated no-caps aria-label="{save_label}"'
            )
            back = _("Back to the model's own settings")
            ui.button(_("The model's own"), icon="undo", on_click=lambda: save(None)).props(
                f'flat no-caps aria-label="{back}"'
            )
        show()
