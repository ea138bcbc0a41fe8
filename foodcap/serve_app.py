"""The Gradio page of `foodcap serve` (layout, events, launch); request logic is in foodcap/serve.py.

    python -c "import foodcap; from foodcap.serve import create_app; \
create_app(foodcap.load_captioner('model_checkpoints/best')).launch(block=True)"
"""
from __future__ import annotations

import html
import logging
from typing import Optional

import gradio as gr

from .serve import MODES, CaptionService, RequestError, ServeConfig, caption_gallery, example_photos

log = logging.getLogger(__name__)

TITLE = "foodcap: caption food photos"
INTRO = ("Upload one or several photos (or click an example), pick a decoding method, press **Caption**. "
         "The same function is the `/caption` API endpoint: see *Use via API* at the bottom of the page.")


class ServeApp:
    """A built Gradio app plus the caption service behind it; `launch` starts it, `close` stops both."""

    def __init__(self, demo: gr.Blocks, service: CaptionService):
        self.demo = demo
        self.service = service
        self.url: Optional[str] = None

    @property
    def stats(self):
        return self.service.stats

    def launch(self, host: str = "127.0.0.1", port: Optional[int] = 7860, *, block: bool = False,
               quiet: bool = False) -> str:
        """Serve on host:port (loopback unless told otherwise); returns the local URL."""
        config = self.service.config
        examples_dir = config.examples_dir
        self.demo.queue(max_size=max(64, 8 * config.max_batch_size))
        _, self.url, _ = self.demo.launch(
            server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
            max_file_size=int(config.max_upload_mb * 1024 * 1024), show_error=True, quiet=quiet,
            allowed_paths=[str(examples_dir)] if examples_dir else None, ssr_mode=False,
            enable_monitoring=False, mcp_server=False, footer_links=["api"])
        log.info("foodcap serve: %s (max upload %g MB, batches of up to %d images)", self.url,
                 config.max_upload_mb, config.max_batch_size)
        if block:
            try:
                self.demo.block_thread()
            finally:
                self.close()
        return self.url

    def close(self) -> None:
        try:
            self.demo.close()
        finally:
            self.service.close()


def create_app(captioner, config: Optional[ServeConfig] = None, *, caption_fn=None) -> ServeApp:
    """Build the page and the `/caption` + `/stats` endpoints for `captioner` (not launched yet)."""
    service = CaptionService(captioner, config, caption_fn=caption_fn)
    config = service.config

    async def caption(files, mode, temperature, top_p, num_beams, num_captions, seed, max_new_tokens):
        """Caption uploaded photos. Returns (gallery of (photo, caption)), {"results": [{"file", "captions"}],
        "decoding": options}); a bad photo or option raises an error naming it."""
        try:
            paths, result = await service.caption(files, mode, temperature, top_p, num_beams, num_captions,
                                                  seed, max_new_tokens)
        except RequestError as error:
            log.info("refused a caption request: %s", error)
            raise gr.Error(html.escape(str(error)), title="Cannot caption this request",
                           print_exception=False) from None
        except Exception as error:  # noqa: BLE001 - say something useful, keep serving
            log.exception("caption request failed")
            raise gr.Error(html.escape(f"captioning failed: {error}"), title="Server error") from None
        return caption_gallery(paths, result), result

    def stats() -> dict:
        """Counters: requests, images, decode_calls (batched model calls), batches, largest_batch."""
        return service.stats.as_dict()

    def show_mode_controls(mode: str):
        return (gr.update(visible=mode == "sampling"), gr.update(visible=mode == "sampling"),
                gr.update(visible=mode == "beam"),
                # greedy has exactly one answer: reset the hidden slider so it cannot cause an error
                gr.update(visible=mode != "greedy", **({"value": 1} if mode == "greedy" else {})),
                gr.update(visible=mode == "sampling"))

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Photos", file_count="multiple", file_types=["image"], type="filepath",
                                elem_id="photos")
                mode = gr.Radio(list(MODES), value="beam", label="Decoding",
                                info="beam: most likely captions; greedy: one quick caption; "
                                     "sampling: varied captions")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature", visible=False)
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", visible=False)
                num_beams = gr.Slider(1, config.max_beams, value=min(5, config.max_beams), step=1,
                                      label="Beam size")
                num_captions = gr.Slider(1, config.max_captions, value=1, step=1, label="Captions per photo")
                with gr.Accordion("More options", open=False):
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (sampling)", visible=False)
                    max_new_tokens = gr.Slider(5, config.max_new_tokens, value=min(30, config.max_new_tokens),
                                               step=1, label="Max new tokens")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Photos", columns=3, object_fit="cover", height=300, preview=False,
                                     fit_columns=False, elem_id="captioned")
                captions_text = gr.Markdown(elem_id="captions")
                with gr.Accordion("Result as the API returns it", open=False):
                    result = gr.JSON(open=True, show_label=False, elem_id="result")
        inputs = [files, mode, temperature, top_p, num_beams, num_captions, seed, max_new_tokens]
        if example_photos(config):
            gr.Examples(examples=[[[path]] for path in example_photos(config)], inputs=[files],
                        label="Example photos (click one)", elem_id="examples")
        mode.change(show_mode_controls, inputs=[mode],
                    outputs=[temperature, top_p, num_beams, num_captions, seed], queue=False, api_visibility="private")
        # Clear the last answer first, so that a refused request never leaves it looking like this one's.
        # concurrency_limit=None: many requests may wait at once; the batcher decides what runs together.
        button.click(lambda: (None, "", None), outputs=[gallery, captions_text, result], queue=False,
                     api_visibility="private"
                     ).then(caption, inputs=inputs, outputs=[gallery, result], api_name="caption",
                            concurrency_limit=None
                     ).success(captions_markdown, inputs=[result], outputs=[captions_text], queue=False,
                               api_visibility="private")
        gr.api(stats, api_name="stats")
    return ServeApp(demo, service)


def captions_markdown(result: Optional[dict]) -> str:
    """The API result as a readable list: each photo's name, then its captions."""
    if not result:
        return ""
    lines = []
    for item in result.get("results", []):
        lines.append(f"**{_markdown_text(item['file'])}**")
        lines += [f"{i}. {_markdown_text(caption)}" for i, caption in enumerate(item["captions"], 1)]
        lines.append("")
    return "\n".join(lines)


def _markdown_text(text: str) -> str:
    """Captions and file names are untrusted text: no HTML, no markdown markup."""
    escaped = html.escape(str(text), quote=False)
    return "".join("\\" + ch if ch in "\\`*_{}[]()#+-.!|<>~" else ch for ch in escaped)

