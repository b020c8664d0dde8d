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
    row_button,
    section,
)

COLUMNS = [
    {"name": "model_id", "label": "Model", "field": "model_id", "align": "left"},
    {
        "name": "architecture",
        "label": "Architecture",
        "field": "architecture",
        "align": "left",
        **WIDE,
    },
    {"name": "layers", "label": "Layers", "field": "layers", **WIDE},
    {"name": "format", "label": "Weights", "field": "format", "align": "left"},
    {"name": "size", "label": "Size", "field": "size"},
    {"name": "networks", "label": "Used by", "field": "networks", "align": "left", **WIDE},
    {"name": "actions", "label": "", "field": "model_id"},
]


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/models")
    def models_page(network: str | None = None) -> None:
        with admin_frame("models", network) as allowed:
            if not allowed:
                return
            section("Models on this PC")
            table = data_table(COLUMNS, "model_id", "No model on this PC yet")
            row_button(
                table,
                "verify",
                label="Verify",
                icon="verified",
                aria="'Verify ' + props.row.model_id",
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
                    follow_job(job, holder, lambda _: refresh())

            async def verify(event) -> None:
                await launch(lambda: ops.verify_model(event.args))

            table.on("verify", verify)

            with ui.element("div").classes("tt-grid"):
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label("Import a model file or folder").classes("font-semibold")
                    ui.label(
                        "A Hugging Face folder (config.json + safetensors) or a .gguf file "
                        "on this PC."
                    ).classes("tt-muted text-sm")
                    path = ui.input("Path on this PC").props("outlined dense")
                    model_id = ui.input("Model id").props("outlined dense")
                    dtype = ui.select(
                        {"": "as it comes", **{f: f for f in WEIGHT_FORMATS}},
                        label="Weight format",
                        value="",
                    ).props("outlined dense")

                    def do_import():
                        return launch(
                            lambda: ops.import_model(
                                path.value.strip(), model_id.value.strip(), dtype.value or None
                            )
                        )

                    ui.button("Import", icon="upload_file", on_click=do_import).props(
                        'unelevated no-caps aria-label="Import"'
                    )
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label("Download from a model repository").classes("font-semibold")
                    ui.label(
                        "A PC of the LAN serving models (tiktrue models serve), e.g. "
                        "http://192.168.1.20:8765. Resumes after an interruption."
                    ).classes("tt-muted text-sm")
                    source = ui.input("Repository URL").props("outlined dense")
                    wanted = ui.input("Model id").props("outlined dense")

                    def do_download():
                        return launch(
                            lambda: ops.download_model(wanted.value.strip(), source.value.strip())
                        )

                    ui.button("Download", icon="download", on_click=do_download).props(
                        'unelevated no-caps aria-label="Download"'
                    )
            refresh()
