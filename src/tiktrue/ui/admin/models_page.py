"""``/admin/models``: the models in this PC's block store; import a Hugging Face folder or a
GGUF file on this PC, download one from a model repository, verify one, each with a progress
bar."""

from __future__ import annotations

from nicegui import ui

from tiktrue.model.quant import WEIGHT_FORMATS
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
from tiktrue.ui.i18n import N_, _, number

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
            refresh()
