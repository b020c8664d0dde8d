"""``/admin/models``: the models in this PC's block store; import a Hugging Face folder or a
GGUF file on this PC, download one from a model repository, verify one, each with a progress
bar."""

from __future__ import annotations

from nicegui import ui

from tiktrue.model.quant import WEIGHT_FORMATS
from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.admin.widgets import WIDE, admin_nav, attempt, fmt_bytes, follow_job, section
from tiktrue.ui.layout import page_frame, require_admin

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
VERIFY_SLOT = r"""
<q-td :props="props">
  <q-btn flat dense no-caps icon="verified" label="Verify"
         :aria-label="'Verify ' + props.row.model_id"
         @click="() => $parent.$emit('verify', props.row.model_id)" />
</q-td>
"""


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/models")
    def models_page(network: str | None = None) -> None:
        if require_admin() is None:
            return
        with page_frame("Admin"):
            admin_nav("models", network)
            section("Models on this PC")
            table = ui.table(columns=COLUMNS, rows=[], row_key="model_id")
            table.props("flat bordered dense wrap-cells").classes("w-full")
            table.add_slot("body-cell-actions", VERIFY_SLOT)
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

            def start(job) -> None:
                if job is not None:
                    with jobs:
                        holder = ui.column().classes("tt-card w-full p-3")
                    follow_job(job, holder, lambda _: refresh())

            async def verify(event) -> None:
                start(await attempt(lambda: ops.verify_model(event.args)))

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

                    async def do_import() -> None:
                        start(
                            await attempt(
                                lambda: ops.import_model(
                                    path.value.strip(), model_id.value.strip(), dtype.value or None
                                )
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

                    async def do_download() -> None:
                        start(
                            await attempt(
                                lambda: ops.download_model(
                                    wanted.value.strip(), source.value.strip()
                                )
                            )
                        )

                    ui.button("Download", icon="download", on_click=do_download).props(
                        'unelevated no-caps aria-label="Download"'
                    )
            refresh()
