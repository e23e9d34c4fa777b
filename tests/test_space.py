"""The Space demo driven in a real headless Chromium (Debian's chromium + chromium-driver) on a
tiny random DiaNA model: load a gallery, describe, answer the proposed questions, ask one's own, reject a
photo by clicking it; after every step the page shows what a search session shows."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from diana.hub_cards.space.app import (  # noqa: E402
    FIRST_QUESTION, DemoBackend, build_demo, cli, default_model_id, find_example_galleries,
)
from diana.modeling_diana import DiaNAModel  # noqa: E402
from diana.processing.search import ChatSearchSession, GalleryIndex  # noqa: E402
from diana.processing.search.questioner import QuestionBank, make_policy  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
TOP_K = 4
DESCRIPTION = "A man in a grey hoodie and blue jeans."
QUESTION, ANSWER = "Is he carrying anything?", "Yes, a red backpack."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def space(tiny_processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(3)
    street = folder / "street"
    street.mkdir()
    for i in range(9):
        pixels = np.zeros((96, 48, 3), np.uint8)
        pixels[:] = rng.integers(40, 220, 3)
        pixels[20:70, 12:36] = rng.integers(0, 255, 3)  # a "person" block on a background
        Image.fromarray(pixels).save(street / f"p{i}.png")
    torch.manual_seed(0)
    # Shaped like the main job's model (mean pooling, conv stem): the page must score what it trained.
    model = DiaNAModel(tiny_config(text_pooling="mean", vision_stem="conv")).eval()
    bank = QuestionBank.from_synthpedes()
    questioner = make_policy("info_gain", QuestionBank(bank.questions[:5], bank.attribute_phrases))  # fewer to score
    backend = DemoBackend(model, tiny_processor, find_example_galleries(folder), k=TOP_K, questioner=questioner)
    demo = build_demo(backend)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                            quiet=True, ssr_mode=False)
    yield url, backend
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("chromium / chromedriver missing: run `scripts/setup.sh --browser` "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _captions(result) -> list[str]:
    return [f"#{rank} · {score:.3f}" for rank, score in enumerate(result.scores, start=1)]


def _expected_captions(backend: DemoBackend, rounds: list[tuple[str, str]]) -> list[list[str]]:
    """What the page must show before any rejection: each round's dialogue encoded whole by the model
    (`encode_dialogues`), scored against the gallery, formatted like the app."""
    index = GalleryIndex.build(backend.galleries["street"], backend.model, backend.processor, progress=False)
    shown = []
    for number in range(1, len(rounds) + 1):
        with torch.no_grad():
            text = backend.model.encode_dialogues(**backend.processor(dialogues=[rounds[:number]]))
        scores = backend.model.similarity(text.text_embeds, index.image_embeds)[0]  # the config's score mode
        top = torch.sort(scores, descending=True, stable=True).values[:TOP_K]
        shown.append([f"#{r} · {s:.3f}" for r, s in enumerate(top.tolist(), start=1)])
    return shown


def test_space_readme_metadata():
    import yaml

    readme = Path(__file__).resolve().parents[1] / "hub_cards" / "space" / "README.md"
    header = yaml.safe_load(readme.read_text().split("---", 2)[1])
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py"
    assert (readme.parent / header["app_file"]).is_file()
    assert default_model_id(readme) == header["models"][0]
    requirements = (readme.parent / "requirements.txt").read_text()
    assert "gradio" in requirements and "transformers" in requirements


def test_space_in_headless_chromium(space, browser, tmp_path):
    """Describe; answer the proposed question; reject a photo by clicking it; answer the next proposal; ask
    an own question. After every step the page shows what a session given the same steps shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, backend = space
    wait = WebDriverWait(browser, 30)
    browser.get(url)
    wait.until(EC.element_to_be_clickable((By.ID, "load"))).click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "9 images"))

    def captions() -> list[str]:
        text = browser.find_element(By.ID, "ranking").text
        return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]

    def wait_for(status: str) -> list[str]:
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), status))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ranking img")) == TOP_K and len(captions()) == TOP_K)
        return captions()

    def answer(text: str, own_question: str | None = None) -> None:
        if own_question:
            browser.find_element(By.CSS_SELECTOR, "#own-question textarea").send_keys(own_question)
        browser.find_element(By.CSS_SELECTOR, "#answer textarea").send_keys(text)
        browser.find_element(By.ID, "submit").click()

    def proposed_on_page() -> str:
        return browser.find_element(By.ID, "proposed").text

    # The same steps on a session of its own, with the app's questioner.
    index = GalleryIndex.build(backend.galleries["street"], backend.model, backend.processor, progress=False)
    session = ChatSearchSession(backend.model, backend.processor, index, k=TOP_K)
    assert "Please describe the person you saw." in proposed_on_page()

    answer(DESCRIPTION)
    first = wait_for("Round 1:")
    assert first == _captions(session.start(DESCRIPTION))
    proposal = backend.questioner.propose(session)
    assert proposal is not None and proposal.question in proposed_on_page()

    answer(ANSWER)
    second = wait_for("Round 2:")
    assert second == _captions(session.add_round(proposal.question, ANSWER))
    assert second != first  # the ranking (or its scores) moved with the new answer
    assert second == _expected_captions(backend, [(FIRST_QUESTION, DESCRIPTION), (proposal.question, ANSWER)])[1]

    browser.find_elements(By.CSS_SELECTOR, "#ranking img")[1].click()  # the photo ranked #2
    wait.until(EC.text_to_be_present_in_element((By.ID, "marked"), "Marked: #2"))
    browser.find_element(By.ID, "reject").click()
    after_reject = wait_for("not this person")
    rejected = session.reject([2])
    assert after_reject == _captions(rejected) and session.rejected == [rejected.rejected[0]]
    proposal = backend.questioner.propose(session)
    assert proposal.question in proposed_on_page()

    answer("Black trousers.")
    third = wait_for("Round 3:")
    assert third == _captions(session.add_round(proposal.question, "Black trousers."))
    answer("No, none.", own_question=QUESTION)
    fourth = wait_for("Round 4:")
    result = session.add_round(QUESTION, "No, none.")
    assert fourth == _captions(result) and rejected.rejected[0] not in result.indices
    chat = browser.find_element(By.ID, "chat").text
    assert all(text in chat for text in (DESCRIPTION, ANSWER, "Not #2.", QUESTION, "No, none."))

    browser.execute_script("window.scrollTo(0, 0);")
    shot = tmp_path / "space.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("DIANA_SPACE_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_prepared_space_folder_is_self_contained(tmp_path):
    import ast
    import subprocess
    import sys

    import yaml

    import diana.processing
    from diana.hub_cards.export import SPACE_RUNTIME, prepare_space

    examples = tmp_path / "imgs"
    examples.mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 20, 3), 50 * i, np.uint8)).save(examples / f"{i}.png")
    space_dir = prepare_space(tmp_path / "space", "someone/diana-small", examples=examples, max_images=3)
    assert sorted(p.name for p in space_dir.iterdir()) == ["README.md", "app.py", "diana", "examples", "requirements.txt"]
    header = yaml.safe_load((space_dir / "README.md").read_text().split("---", 2)[1])
    assert header["models"] == ["someone/diana-small"] and header["sdk"] == "gradio"
    assert default_model_id(space_dir / "README.md") == "someone/diana-small"
    assert find_example_galleries(space_dir / "examples") == {
        "imgs": [str((space_dir / "examples" / "imgs" / f"{i}.png").resolve()) for i in range(3)]
    }
    source = Path(diana.processing.__file__).parent
    copied = sorted(str(p.relative_to(space_dir / "diana" / "processing")) for p in space_dir.rglob("*.py")
                    if p.name != "app.py")
    assert copied == sorted([*SPACE_RUNTIME, "__init__.py"])
    for name in SPACE_RUNTIME:
        assert (space_dir / "diana" / "processing" / name).read_bytes() == (source / name).read_bytes()
    # The Space does not install this project: the copy may import only what requirements.txt provides
    # (faiss and datasets lazily, only by the FAISS back end and add_dataset; huggingface_hub, which
    # transformers installs, lazily by cli_errors' Hub checks) and itself.
    allowed = set(sys.stdlib_module_names) | {"numpy", "torch", "PIL", "safetensors", "tqdm", "matplotlib",
                                              "transformers", "faiss", "datasets", "diana", "yaml", "huggingface_hub"}
    imported = set()
    for path in [space_dir / "app.py", *(space_dir / "diana").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert imported <= allowed | {"gradio"}, imported - allowed
    # Run from the Space folder with the project not importable: the copy is what gets imported.
    script = ("import diana.processing.search as s, diana.processing.image_loading as il; "
              "assert s.__file__.startswith('{root}'), s.__file__; "
              "print(il.load_rgb_image(s.list_images('examples')[0]).shape)").format(root=space_dir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path[:0] = ['', *" + repr(
        [p for p in sys.path if "site-packages" in p]) + "]; exec(" + repr(script) + ")"],
        cwd=space_dir, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(40, 20, 3)"


@pytest.mark.parametrize("argv, says", [
    (["--model_name_or_path", "m", "--top_k", "x"], "argument --top_k: invalid int value: 'x'"),
    (["--model_name_or_path", "no/such/folder"], "--model_name_or_path: model folder not found: no/such/folder"),
])
def test_app_errors_are_one_line_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {says}\n"
