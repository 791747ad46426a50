"""The labeling page in a real headless Chromium: clicks and number keys label the images, undo and "not sure" work,
the saved labels.csv is read back and a training run starts from it (skipped where Chromium or its driver is absent:
scripts/setup.sh installs both with apt)."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from fixmatch.cli import main
from fixmatch.data.datasets import DatasetError, load_dataset
from fixmatch.inference.labeling_page import write_labeling_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                    reason="Chromium or chromedriver is not installed (scripts/setup.sh installs "
                                           "both with apt: chromium, chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium that saves downloads into the yielded folder without asking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # both paths given: Selenium looks nothing up on the network
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,860"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver, downloads
    finally:
        driver.quit()


def _data_set():
    """Fashion-MNIST where it is installed (garments make a telling screenshot), else the built-in synthetic set."""
    try:
        return "fashion-mnist", load_dataset("fashion-mnist", download=False)
    except DatasetError:
        return "synthetic", load_dataset("synthetic")


def _wait_for(path, seconds=20.0):
    end = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < end:  # Chrome renames its .crdownload when done
        time.sleep(0.1)
    return path.read_text()


def _text(driver, element_id):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, element_id).text


@needs_chromium
def test_label_by_clicks_and_keys_save_and_train_from_the_file(browser, tmp_path, capsys, one_thread):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, downloads = browser
    name, data = _data_set()
    classes = data.class_names
    # One training image of each class, then two more: 12 images to label.
    picks = [int((data.train_labels == c).nonzero()[0, 0]) for c in range(10)]
    picks += [int((data.train_labels == c).nonzero()[1, 0]) for c in (0, 1)]
    images = data.train_images[picks].permute(0, 2, 3, 1).numpy()
    page = tmp_path / "advice" / "index.html"
    page.parent.mkdir()
    write_labeling_page(page, images, [str(i) for i in picks], classes, id_column="index")
    driver.get(page.as_uri())

    body = driver.find_element(By.TAG_NAME, "body")
    buttons = driver.find_elements(By.CSS_SELECTOR, "button.label")
    assert [b.text.split(" ", 1)[1] for b in buttons] == classes
    assert _text(driver, "progress") == "0 labeled / 0 skipped / 12 total"
    assert _text(driver, "caption") == f"index {picks[0]} (1 of 12)"
    shown = driver.find_element(By.CSS_SELECTOR, "img.item:not([hidden])")
    # drawn some whole number of times as large (at least 300 CSS pixels), each pixel a sharp square
    side = images.shape[2]
    width = driver.execute_script("return arguments[0].clientWidth", shown)
    assert width >= 300 and width % side == 0
    assert shown.value_of_css_property("image-rendering") == "pixelated"

    buttons[0].click()  # image 0: class 0, by a click
    body.send_keys("2")  # image 1: key 2, class 1
    body.send_keys("5")  # image 2: a wrong key (class 4) ...
    assert _text(driver, "progress") == "3 labeled / 0 skipped / 12 total"
    body.send_keys("u")  # ... undone with u ...
    assert _text(driver, "progress") == "2 labeled / 0 skipped / 12 total"
    assert _text(driver, "caption") == f"index {picks[2]} (3 of 12)"
    body.send_keys("3")  # ... and labeled again: class 2
    for c in (3, 4, 5):  # images 3-5 by clicks
        buttons[c].click()
    body.send_keys("789")  # images 6-8 by keys
    driver.find_element(By.ID, "not-sure").click()  # image 9: not sure, by the button ...
    driver.find_element(By.ID, "undo").click()  # ... undone with the button ...
    body.send_keys("0")  # ... and labeled with key 0: the tenth class
    body.send_keys("s")  # image 10: not sure, by its key
    assert _text(driver, "progress") == "10 labeled / 1 skipped / 12 total"
    screenshot = tmp_path / "labeling-page.png"
    driver.save_screenshot(str(screenshot))  # mid-way: an image, the buttons and the count
    body.send_keys("1", Keys.BACKSPACE, "2")  # image 11 (class 1): 1, Backspace undoes it, 2
    assert _text(driver, "progress") == "11 labeled / 1 skipped / 12 total"
    assert driver.find_element(By.ID, "done").is_displayed() and not buttons[0].is_enabled()
    driver.find_element(By.ID, "save").click()
    saved = _wait_for(downloads / "labels.csv")
    assert _text(driver, "status") == "saved labels.csv: 11 labeled images"
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []

    rows = list(csv.reader(io.StringIO(saved)))
    expected = [(picks[c], classes[c]) for c in range(10)] + [(picks[11], classes[1])]
    assert rows == [["index", "label"]] + [[str(i), name] for i, name in expected]

    # The screenshot is a real picture of the page (the README's is made this way: FIXMATCH_SCREENSHOT=path).
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 800 and shot.size[1] >= 600
        pixels = np.asarray(shot.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50
    if os.environ.get("FIXMATCH_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["FIXMATCH_SCREENSHOT"])

    run = tmp_path / "run"
    assert main(["train", "--dataset", name, "--labels-csv", str(downloads / "labels.csv"), "--model",
                 "cnn_small", "--batch-size", "4", "--mu", "2", "--steps", "2", "--eval-every", "2",
                 "--eval-batch-size", "500", "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    assert json.loads((run / "split.json").read_text())["labeled"] == sorted(i for i, _ in expected)


@needs_chromium
def test_names_from_users_files_are_text_and_csv_fields_are_quoted(browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    (downloads / "labels.csv").unlink(missing_ok=True)
    classes = ['<b onmouseover="x()">bold</b>', 'a,"quoted"', "$DATA"]
    ids = ["pics/one,two.png", 'pics/"three".png', "pics/</script><script>alert(1)</script>.png"]
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 12, 1), dtype=np.uint8)  # grey, not square
    page = tmp_path / "index.html"
    given = [("old/four,five.png", classes[1]), ('old/"six".png', classes[0])]  # labeled earlier: saved first
    write_labeling_page(page, images, ids, classes, id_column="path", title="<i>pets</i>", given=given)
    driver.get(page.as_uri())
    assert driver.title == "<i>pets</i>" and driver.find_elements(By.CSS_SELECTOR, "b, i") == []
    buttons = driver.find_elements(By.CSS_SELECTOR, "button.label")
    assert [b.text.split(" ", 1)[1] for b in buttons] == classes
    assert _text(driver, "caption") == f"path {ids[0]} (1 of 3)"
    for c in (1, 0, 2):
        buttons[c].click()
    driver.find_element(By.ID, "save").click()
    rows = list(csv.reader(io.StringIO(_wait_for(downloads / "labels.csv"))))
    assert rows == [["path", "label"], *map(list, given), [ids[0], classes[1]], [ids[1], classes[0]],
                    [ids[2], classes[2]]]
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


@needs_chromium
def test_the_page_advise_writes_saves_the_earlier_labels_too(browser, tmp_path, capsys, one_thread):
    """"10 more after the first 10": advise --labels-csv, label on its page, and the download is all 14 labels, from
    which training starts with exactly those images."""
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    (downloads / "labels.csv").unlink(missing_ok=True)
    data = load_dataset("synthetic")
    first = [int((data.train_labels == c).nonzero()[0, 0]) for c in range(10)]  # one image per class
    first_csv = tmp_path / "first.csv"  # class numbers, as a script may write them
    first_csv.write_text("index,label\n" + "".join(f"{i},{int(data.train_labels[i])}\n" for i in first))
    out = tmp_path / "advice"
    assert main(["advise", "--dataset", "synthetic", "--budget", "4", "--labels-csv", str(first_csv), "--out",
                 str(out), "--device", "cpu"]) == 0
    proposed = [int(r["index"]) for r in csv.DictReader(io.StringIO((out / "to_label.csv").read_text()))]
    assert len(proposed) == 4 and not set(proposed) & set(first)

    driver.get((out / "index.html").as_uri())
    body = driver.find_element(By.TAG_NAME, "body")
    assert _text(driver, "progress") == "0 labeled / 0 skipped / 4 total (+ 10 labeled earlier)"
    assert _text(driver, "caption") == f"index {proposed[0]} (1 of 4)"
    for i in proposed[:3]:  # the annotator answers with the true class's number key
        body.send_keys("1234567890"[int(data.train_labels[i])])
    body.send_keys("s")  # and is not sure of the last one
    assert _text(driver, "progress") == "3 labeled / 1 skipped / 4 total (+ 10 labeled earlier)"
    driver.find_element(By.ID, "save").click()
    saved = _wait_for(downloads / "labels.csv")
    assert _text(driver, "status") == "saved labels.csv: 13 labeled images (10 earlier, 3 new)"
    names = data.class_names
    assert list(csv.reader(io.StringIO(saved))) == [["index", "label"]] + [
        [str(i), names[int(data.train_labels[i])]] for i in first + proposed[:3]]

    run = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--labels-csv", str(downloads / "labels.csv"), "--model",
                 "cnn_small", "--batch-size", "4", "--mu", "2", "--steps", "1", "--eval-every", "1",
                 "--eval-batch-size", "500", "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    assert json.loads((run / "split.json").read_text())["labeled"] == sorted(first + proposed[:3])


def test_page_is_one_self_contained_file_written_atomically(tmp_path):
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    page = tmp_path / "index.html"
    write_labeling_page(page, images, ["0", "1"], ["cat", "dog"], id_column="index")
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 2 and "http" not in text.replace("http-equiv", "")
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]  # no temporary left beside it
    link = tmp_path / "link.html"
    link.symlink_to(tmp_path / "elsewhere.html")
    from fixmatch.core.files import FileError
    with pytest.raises(FileError, match="it is a symbolic link"):
        write_labeling_page(link, images, ["0", "1"], ["cat", "dog"], id_column="index")
    for bad, message in (({"images": images[..., :2]}, "C 1 or 3"), ({"ids": ["0", "0"]}, "each of the 2 images"),
                         ({"classes": []}, "distinct names"), ({"id_column": "name"}, "index, path"),
                         ({"given": [("1", "dog")]}, "none of the images to label"),
                         ({"given": [("7", "dog"), ("7", "cat")]}, "each earlier labeled image once")):
        args = {"images": images, "ids": ["0", "1"], "classes": ["cat", "dog"], "id_column": "index", **bad}
        with pytest.raises(ValueError, match=message):
            write_labeling_page(page, args.pop("images"), args.pop("ids"), args.pop("classes"), **args)
