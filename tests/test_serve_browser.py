"""`foodcap serve` in a real browser: Debian's Chromium, headless, driven by Playwright, on loopback.

    pytest -x -q tests/test_serve_browser.py

Needs /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it); Playwright never downloads a
browser here. Leaves test-artifacts/serve_screenshot.png behind.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest
import torch

from conftest import IMAGES, REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
MAX_NEW_TOKENS = 12
TIMEOUT_MS = 60_000

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")
if not CHROMIUM.exists():
    pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from foodcap.checkpoint import save_checkpoint
    from foodcap.language import load_language_model
    from foodcap.model import ClipCaptionModel, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(mapping_type="mlp", prefix_length=4, clip_length=4, num_layers=2, clip_dim=64,
                         gpt2="tiny", clip_model="tiny", only_prefix=True)
    directory = tmp_path_factory.mktemp("serve_browser") / "ckpt"
    save_checkpoint(ClipCaptionModel(config, load_language_model("tiny")).eval(), directory)
    return directory


@pytest.fixture(scope="module")
def app(checkpoint):
    from foodcap.captioner import load_captioner
    from foodcap.serve import ServeConfig, create_app

    served = create_app(load_captioner(checkpoint, device="cpu"), ServeConfig(batch_wait_ms=5))
    served.launch("127.0.0.1", free_port(), quiet=True)
    try:
        yield served
    finally:
        served.close()


@pytest.fixture(scope="module")
def page(app):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.set_default_timeout(TIMEOUT_MS)
            tab.goto(app.url)
            tab.wait_for_selector("#photos input[type=file]", state="attached")
            yield tab
        finally:
            browser.close()


def caption_in_page(tab, photos) -> None:
    """Upload `photos` and press Caption."""
    tab.locator("#photos input[type=file]").set_input_files([str(p) for p in photos])
    for photo in photos:  # the upload is done when the file list has a row labelled with the name
        tab.locator("#photos").get_by_label(photo.name, exact=True).wait_for()
    tab.locator("#caption-button").click()


def set_max_new_tokens(tab, value: int) -> None:
    tab.get_by_text("More options").click()
    box = tab.get_by_label("number input for Max new tokens")
    box.fill(str(value))
    box.press("Enter")
    box.press("Tab")  # the slider commits its value on blur too; wait until the range input shows it
    playwright_api.expect(tab.get_by_label("range slider for Max new tokens")).to_have_value(str(value))


def clear_photos(tab) -> None:
    tab.locator("#photos").get_by_label("Clear").first.click()
    tab.locator("#photos").get_by_label("Click to upload or drop files").wait_for()


def test_upload_caption_error_then_caption_again(page, app, checkpoint, tmp_path, artifacts_dir):
    from foodcap.captioner import load_captioner

    reference = load_captioner(checkpoint, device="cpu")
    good, other = IMAGES / "scone.jpg", IMAGES / "inf1.jpg"
    expected = reference.caption([str(good), str(other)], num_beams=5, max_new_tokens=MAX_NEW_TOKENS)
    assert expected[0] != expected[1]  # so the page shows which photo it captioned
    captions = page.locator("#captions")

    set_max_new_tokens(page, MAX_NEW_TOKENS)
    caption_in_page(page, [good])  # the page's default: beam search, beam size 5, one caption
    captions.get_by_text(good.name).wait_for()
    assert expected[0] in captions.inner_text() and expected[1] not in captions.inner_text()

    fake = tmp_path / "menu.jpg"
    fake.write_text("this is a menu, not a photo\n")
    clear_photos(page)
    caption_in_page(page, [fake])
    error = page.get_by_test_id("toast-text").filter(has_text="menu.jpg: not an image")  # the error, in the page
    error.wait_for()
    assert "upload a JPEG, PNG or WebP photo" in error.inner_text()
    assert good.name not in captions.inner_text()  # the previous answer is gone, not passed off as this one

    clear_photos(page)
    caption_in_page(page, [other])
    captions.get_by_text(other.name).wait_for()
    assert expected[1] in captions.inner_text()
    assert app.stats.requests == 2  # the fake photo was refused before decoding

    example = REPO / "Images" / "inf2.jpg"  # the page's examples come from Images/
    clear_photos(page)
    page.locator("#examples").get_by_text(example.name, exact=True).click()
    page.locator("#photos").get_by_label(example.name, exact=True).wait_for()
    page.locator("#caption-button").click()
    captions.get_by_text(example.name).wait_for()
    assert reference.caption(str(example), num_beams=5, max_new_tokens=MAX_NEW_TOKENS) in captions.inner_text()


def test_sampling_several_captions_and_screenshot(page, app, checkpoint, artifacts_dir):
    """Sampling with two captions per photo for two photos; the screenshot shows it (README: Images/)."""
    from foodcap.captioner import load_captioner

    reference = load_captioner(checkpoint, device="cpu")
    photos = [IMAGES / "scone.jpg", IMAGES / "inf1.jpg"]
    # the page's sampling defaults: temperature 1, top-p 0.9, seed 0
    expected = reference.caption([str(p) for p in photos], do_sample=True, temperature=1.0, top_p=0.9, seed=0,
                                 num_return_sequences=2, max_new_tokens=MAX_NEW_TOKENS)
    page.get_by_label("sampling", exact=True).check()
    page.get_by_label("number input for Temperature").wait_for()  # sampling's sliders appear
    box = page.get_by_label("number input for Captions per photo")
    box.fill("2")
    box.press("Enter")
    clear_photos(page)
    caption_in_page(page, photos)
    captions = page.locator("#captions")
    for photo in photos:
        captions.get_by_text(photo.name).wait_for()
    text = captions.inner_text()
    assert all(caption in text for per_photo in expected for caption in per_photo), (expected, text)

    for close in page.get_by_test_id("toast-close").all():  # an error toast left by the test above
        close.click()
    page.get_by_test_id("toast-body").first.wait_for(state="detached")
    page.screenshot(path=str(artifacts_dir / "serve_screenshot.png"), full_page=True)
    assert (artifacts_dir / "serve_screenshot.png").stat().st_size > 10_000
