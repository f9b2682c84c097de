"""The reward server and RemoteReward against real servers on 127.0.0.1: scores, errors, retries, failures, load."""

import base64
import contextlib
import http.client
import io
import json
import math
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from align_diffusion.cli import main
from align_diffusion.rewards.base import Reward, RewardError
from align_diffusion.names import REWARD_TOKEN_ENV as TOKEN_ENV
from align_diffusion.rewards.remote import TIMEOUT_ENV, RemoteReward
from align_diffusion.rewards.server import RewardRequestHandler, make_server
from align_diffusion.rewards.simple import ShapesReward
from align_diffusion.rewards.spec import load_reward
from align_diffusion.training.prompts import ReferenceSource
from align_diffusion.world.evaluate import score_image
from align_diffusion.world.prompts import all_prompts
from align_diffusion.world.render import render_prompt

TOKEN = "test-token"
PROMPTS = ["a red circle", "two squares", "a green triangle left of a red square",
           "a yellow circle and a blue square", "a triangle"]


class MeanReward(Reward):
    """Mean pixel value; NaN where the prompt is "nan". Cheap enough for the load test."""

    def __init__(self):
        super().__init__("mean")

    def score(self, images, prompts, metadata):
        rewards = images.mean(dim=(1, 2, 3))
        return torch.where(torch.tensor([p == "nan" for p in prompts]), math.nan, rewards)


class StallReward(Reward):
    """Signals `entered`, then blocks until `release` is set."""

    def __init__(self):
        super().__init__("stall")
        self.entered, self.release = threading.Event(), threading.Event()

    def score(self, images, prompts, metadata):
        self.entered.set()
        self.release.wait(timeout=30)
        return torch.zeros(len(images))


class FlakyReward(Reward):
    """Raises on its first `failures` calls, then scores 1."""

    def __init__(self, failures: int):
        super().__init__("flaky")
        self.failures, self.calls = failures, 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"model crashed on call {self.calls}")
        return torch.ones(len(images))


class InfiniteReward(Reward):
    """Scores every image +inf: a broken model, not a bad request."""

    def __init__(self):
        super().__init__("infinite")

    def score(self, images, prompts, metadata):
        return torch.full((len(images),), math.inf)


class OverlapReward(Reward):
    """Records how many calls run at once: the server must never score on two threads together."""

    def __init__(self):
        super().__init__("overlap")
        self.inside, self.most, self.lock = 0, 0, threading.Lock()

    def score(self, images, prompts, metadata):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.05)
        with self.lock:
            self.inside -= 1
        return torch.zeros(len(images))


@contextlib.contextmanager
def serving(reward, token=TOKEN, **kwargs):
    server = make_server(reward, token=token, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def shapes_server():
    with serving(ShapesReward()) as server:
        yield server


@pytest.fixture(scope="module")
def mean_server():
    with serving(MeanReward()) as server:
        yield server


def world_images():
    return [Image.fromarray(render_prompt(prompt, seed)) for seed, prompt in enumerate(PROMPTS)]


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request(server, method, path, body=b"", headers=None):
    """(status, parsed JSON answer) of one raw HTTP request."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def score_body(prompts, images, **extra) -> bytes:
    return json.dumps({"prompts": prompts, "images": [png_base64(i) for i in images], **extra}).encode()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_remote_scores_equal_local_scores(shapes_server):
    images, local = world_images(), ShapesReward()
    remote = RemoteReward(shapes_server.url, TOKEN)
    shuffled = PROMPTS[1:] + PROMPTS[:1]  # mismatched prompts give scores other than 1
    for prompts in (PROMPTS, shuffled):
        expected = local(images, prompts)
        assert torch.equal(remote(images, prompts), expected)
    assert not torch.all(local(images, shuffled) == 1)
    as_tensor = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) / 255 for i in images])
    assert torch.equal(remote(as_tensor, PROMPTS), local(as_tensor, PROMPTS))


def test_health_needs_no_token_and_says_whether_one_given_is_taken(shapes_server):
    status, answer = request(shapes_server, "GET", "/health")
    assert status == 200 and answer["status"] == "ok" and answer["reward"] == "shapes"
    assert answer["max_body_bytes"] == 64 * 2**20 and "authorized" not in answer
    assert request(shapes_server, "GET", "/health", headers=AUTH)[1]["authorized"] is True
    assert request(shapes_server, "GET", "/health", headers={"Authorization": "Bearer wrong"})[1]["authorized"] is False


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}])
def test_score_without_the_right_token_is_401(shapes_server, headers):
    status, answer = request(shapes_server, "POST", "/score", score_body(PROMPTS[:1], world_images()[:1]), headers)
    assert status == 401 and "token" in answer["error"]


def counted(server, monkeypatch) -> list:
    """The connections `server` accepts from now on (one per client attempt), recorded as they arrive."""
    accepted, handle = [], server.process_request

    def process_request(request, client_address):
        accepted.append(client_address)
        handle(request, client_address)

    monkeypatch.setattr(server, "process_request", process_request)
    return accepted


def test_client_with_a_wrong_token_fails_at_once(shapes_server, monkeypatch):
    remote = RemoteReward(shapes_server.url, "wrong", attempts=3, backoff=0.01)
    attempts = counted(shapes_server, monkeypatch)
    with pytest.raises(RewardError, match="401"):
        remote(world_images(), PROMPTS)
    assert len(attempts) == 1  # 4xx is not retried


def bad_bodies():
    image = png_base64(world_images()[0])
    return {
        "not json": b"{prompts: ",
        "an integer of 5000 digits": b'{"prompts": [' + b"1" * 5000 + b"]}",  # beyond what Python's int reads
        "not an object": b"[1, 2]",
        "missing images": json.dumps({"prompts": ["a red circle"]}).encode(),
        "mismatched lengths": json.dumps({"prompts": ["a red circle", "a triangle"], "images": [image]}).encode(),
        "non-string prompt": json.dumps({"prompts": [3], "images": [image]}).encode(),
        "not base64": json.dumps({"prompts": ["a red circle"], "images": ["%%%"]}).encode(),
        "not an image": json.dumps({"prompts": ["a red circle"],
                                    "images": [base64.b64encode(b"no png here").decode()]}).encode(),
        "metadata length": json.dumps({"prompts": ["a red circle"], "images": [image], "metadata": [{}, {}]}).encode(),
    }


@pytest.mark.parametrize("case", list(bad_bodies()))
def test_malformed_requests_are_400(shapes_server, case):
    status, answer = request(shapes_server, "POST", "/score", bad_bodies()[case], AUTH)
    assert status == 400 and answer["error"]


def test_a_check_with_an_integer_python_will_not_read_is_400_not_a_dropped_connection(shapes_server):
    status, answer = request(shapes_server, "POST", "/check", b'{"height": ' + b"9" * 5000 + b"}", AUTH)
    assert status == 400 and "body is not JSON" in answer["error"]


def png_with_short_idat() -> bytes:
    """A PNG whose IDAT chunk declares 1 byte of its 20: PIL then reads data as a chunk header, a SyntaxError."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    idat = data.find(b"IDAT")
    data[idat - 4 : idat] = struct.pack(">I", 1)
    return bytes(data)


def test_a_png_that_pil_rejects_with_syntax_error_is_400(shapes_server):
    with pytest.raises(SyntaxError, match="broken PNG"):
        Image.open(io.BytesIO(png_with_short_idat())).convert("RGB")
    body = json.dumps({"prompts": ["a red circle"], "images": [base64.b64encode(png_with_short_idat()).decode()]})
    status, answer = request(shapes_server, "POST", "/score", body.encode(), AUTH)
    assert status == 400 and "undecodable image: broken PNG" in answer["error"]


def test_a_batch_that_would_decode_to_too_many_pixels_is_400_before_decoding(shapes_server):
    """17 solid 4096² PNGs are a 1 MB body but 285 M pixels, 3.4 GB as float32; each alone is within the limit."""
    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096), (200, 30, 30)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    body = json.dumps({"prompts": ["a red circle"] * 17, "images": [encoded] * 17}).encode()
    status, answer = request(shapes_server, "POST", "/score", body, AUTH)
    assert status == 400 and "exceeds" in answer["error"] and "fewer or smaller images" in answer["error"]


class CrashingImageFile(ImageFile.ImageFile):
    """An image format whose reader fails with an error PIL's own plugins never raise."""

    format = "CRASHTEST"

    def _open(self):
        raise ZeroDivisionError("reader bug")


@pytest.fixture
def crashing_image_format():
    Image.register_open(CrashingImageFile.format, CrashingImageFile, lambda prefix: prefix.startswith(b"CRASH"))
    yield b"CRASH" + bytes(32)
    Image.ID.remove(CrashingImageFile.format)
    del Image.OPEN[CrashingImageFile.format]


def test_an_unforeseen_decoding_failure_is_answered_500(shapes_server, crashing_image_format):
    body = json.dumps({"prompts": ["a red circle"], "images": [base64.b64encode(crashing_image_format).decode()]})
    status, answer = request(shapes_server, "POST", "/score", body.encode(), AUTH)
    assert status == 500 and "reader bug" in answer["error"]


def test_unknown_paths_are_404(shapes_server):
    assert request(shapes_server, "GET", "/nope")[0] == 404
    assert request(shapes_server, "POST", "/scores", b"{}", AUTH)[0] == 404


def test_a_url_with_a_path_or_query_reaches_the_server_and_a_fragment_is_refused(shapes_server):
    images = world_images()
    for suffix in ("/?key=1", "?key=1&b=2", "/"):
        assert torch.equal(RemoteReward(shapes_server.url + suffix, TOKEN)(images, PROMPTS),
                           ShapesReward()(images, PROMPTS))
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        RemoteReward(shapes_server.url + "#score", TOKEN)
    with pytest.raises(ValueError, match="a user or password in the URL is not sent") as refused:
        RemoteReward(shapes_server.url.replace("http://", "http://me:secret@"), TOKEN)
    assert "secret" not in str(refused.value)


def test_check_prompts_asks_the_server_before_any_image_is_made(shapes_server):
    remote = RemoteReward(shapes_server.url, TOKEN)
    remote.check_prompts(PROMPTS)
    remote.check_prompts(PROMPTS[0])  # one string is one prompt
    with pytest.raises(ValueError, match="not a shapes-world prompt: 'a photo of a cat'"):
        remote.check_prompts(PROMPTS + ["a photo of a cat"])
    with pytest.raises(RewardError, match="401"):
        RemoteReward(shapes_server.url, "wrong").check_prompts(PROMPTS)
    status, answer = request(shapes_server, "POST", "/check", json.dumps({"prompts": "a red circle"}).encode(), AUTH)
    assert status == 400 and answer["error"] == "prompts must be a list of strings"


def test_a_server_of_the_previous_protocol_is_asked_nothing_it_refuses(monkeypatch):
    """Before the size check, /check read `prompts` alone and required them: the size check sends none to check, so
    such a server answers as for no prompts (and checks no size), rather than refusing every run."""
    def previous_check(self, body):
        if not isinstance(json.loads(body).get("prompts"), list):
            return self.send_json(400, {"error": "prompts must be a list of strings"})
        self.send_json(200, {})

    monkeypatch.setattr(RewardRequestHandler, "check", previous_check)
    with serving(ShapesReward()) as server:
        RemoteReward(server.url, TOKEN).check_size(32, 32)


def test_check_size_asks_the_server_before_any_image_is_made(shapes_server):
    """A size the served reward refuses fails where a local reward's would, not at the first batch of a run."""
    remote = RemoteReward(shapes_server.url, TOKEN)
    remote.check_size(64, 64)
    with pytest.raises(ValueError, match="HTTP 400: ShapesEval judges 64×64 shapes-world images, got 32×32"):
        remote.check_size(32, 32)
    for size in ({"height": 64}, {"height": 64, "width": 0}, {"height": True, "width": 64}):
        status, answer = request(shapes_server, "POST", "/check", json.dumps(size).encode(), AUTH)
        assert status == 400 and answer["error"] == "height and width must both be whole numbers >= 1"


def test_an_image_of_more_than_8_bits_a_channel_is_refused_not_clipped(mean_server, tmp_path):
    """Wherever images are read: by the server, by a reward, from a references folder, by ShapesEval."""
    gray = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-gray, which RGB would clip to white
    assert gray.mode.startswith("I")
    status, answer = request(mean_server, "POST", "/score", score_body(["a"], [gray]), AUTH)
    assert status == 400 and f"an image of mode {gray.mode}; expected 8 bits a channel" in answer["error"]
    with pytest.raises(ValueError, match=f"image: an image of mode {gray.mode}; expected 8 bits a channel"):
        MeanReward()([gray], ["a"])
    assert MeanReward()([Image.new("L", (8, 8), 51)], ["a"]).item() == pytest.approx(0.2)
    gray.save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match=f"gray.png: an image of mode {Image.open(tmp_path / 'gray.png').mode}"):
        ReferenceSource(str(tmp_path)).draw(["a"], seed=0, step=0)
    with pytest.raises(ValueError, match="an image of mode I"):
        score_image("a circle", Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)))


def test_an_image_with_transparent_pixels_is_refused_and_an_opaque_one_with_alpha_scored(mean_server):
    """Transparent pixels have no color of their own (CLIP's processor puts white behind them, open_clip's drops
    the alpha): scoring them would score a made-up color."""
    pixels = np.full((8, 8, 4), 51, dtype=np.uint8)
    pixels[..., 3] = 255
    opaque = Image.fromarray(pixels)
    assert opaque.mode == "RGBA" and MeanReward()([opaque], ["a"]).item() == pytest.approx(0.2)
    pixels[:4, :, 3] = 0
    for image in (Image.fromarray(pixels), Image.fromarray(pixels).convert("P")):
        with pytest.raises(ValueError, match="image: an image with transparent pixels"):
            MeanReward()([image], ["a"])
        status, answer = request(mean_server, "POST", "/score", score_body(["a"], [image]), AUTH)
        assert status == 400 and "an image with transparent pixels" in answer["error"]


def test_check_asks_each_distinct_prompt_once_in_bodies_the_server_takes(monkeypatch, caplog):
    statuses = answered(monkeypatch)
    prompts = [prompt for category in all_prompts().values() for prompt in category]
    with serving(ShapesReward(), max_body_bytes=2_000) as server:
        remote = RemoteReward(server.url, TOKEN)
        remote.check_prompts(prompts * 3)
        assert 413 not in statuses and len(json.dumps(prompts)) // 2_000 < statuses.count(200) - 1 < 40
        statuses.clear()
        remote.check_prompts(["a red circle"] * 1000)
        assert statuses == [200]  # one question: /health answered already
        with pytest.raises(ValueError, match="not a shapes-world prompt: 'a photo of a cat'"):
            remote.check_prompts(prompts + ["a photo of a cat"])

    class Failing(ShapesReward):
        def check_prompt_list(self, prompts):
            raise RuntimeError("the model behind it is down")

    with serving(Failing()) as server:
        with pytest.raises(RewardError, match="HTTP 500: reward shapes failed: RuntimeError"):
            RemoteReward(server.url, TOKEN, attempts=1).check_prompts(["a red circle"])
    without_check = Scripted([(404, {"error": "unknown path /check"})])  # a server of the protocol's first version
    try:
        with caplog.at_level("WARNING", logger="align_diffusion.rewards.remote"):
            RemoteReward(without_check.url, TOKEN).check_prompts(["a photo of a cat"])
            RemoteReward(without_check.url, TOKEN).check_size(32, 32)
    finally:
        without_check.close()
    assert "has no /check" in caplog.text


def test_requests_decode_no_more_pixels_at_once_than_one_batch_may(monkeypatch):
    """A request waits, undecoded, until its batch fits beside those being scored."""
    monkeypatch.setattr("align_diffusion.rewards.server.MAX_BATCH_PIXELS", 2 * 64 * 64)
    reward, seen = StallReward(), []
    with serving(reward) as server:
        first = threading.Thread(target=request, args=(server, "POST", "/score",
                                                       score_body(["a"] * 2, noise_images(2)), AUTH))
        second = threading.Thread(target=request, args=(server, "POST", "/score",
                                                        score_body(["b"], noise_images(1)), AUTH))
        first.start()
        assert reward.entered.wait(timeout=10)
        second.start()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline or len(seen) < 20:  # the second request arrives, and must wait
            seen.append(server.pixels_in_flight)
            time.sleep(0.01)
        reward.release.set()
        first.join(timeout=10)
        second.join(timeout=10)
        assert server.pixels_in_flight == 0
    assert set(seen) == {2 * 64 * 64}, seen
    assert not first.is_alive() and not second.is_alive()


def test_oversized_body_is_413_before_it_is_sent():
    with serving(MeanReward(), max_body_bytes=10_000) as server:
        host, port = server.server_address[:2]
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.putrequest("POST", "/score")
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.putheader("Content-Length", str(10**9))
        connection.endheaders()  # headers only: a server waiting for the body would time this out
        response = connection.getresponse()
        assert response.status == 413 and "exceeds" in json.loads(response.read())["error"]
        connection.close()


def answered(monkeypatch) -> list[int]:
    """The status of every answer the reward servers send from now on."""
    statuses, send_response = [], RewardRequestHandler.send_response

    def recorded(self, code, message=None):
        statuses.append(code)
        send_response(self, code, message)

    monkeypatch.setattr(RewardRequestHandler, "send_response", recorded)
    return statuses


def noise_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)  # noise: PNG cannot compress it, so each image is about 16 KB a request
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


def means(images) -> list[float]:
    return pytest.approx([float(np.asarray(image).mean()) / 255 for image in images])


def test_a_batch_over_the_servers_limit_goes_in_parts_and_one_image_over_it_raises(monkeypatch):
    noise, statuses = noise_images(16), answered(monkeypatch)
    with serving(MeanReward(), max_body_bytes=50_000) as server:  # about 3 of these images a request
        remote = RemoteReward(server.url, TOKEN, attempts=1)
        assert remote(noise, [str(k) for k in range(16)]).tolist() == means(noise)
        assert 413 not in statuses and statuses.count(200) > 4  # split before sending, as /health said
        server.max_body_bytes = 25_000  # lowered after the client asked: the server's refusals split the batch
        assert remote(noise[:4], ["x"] * 4).tolist() == means(noise[:4])
        assert 413 in statuses
    with serving(MeanReward(), max_body_bytes=5_000) as server:
        statuses.clear()
        with pytest.raises(RewardError, match="takes requests of up to 5000 bytes \\(its /health\\), and one image "
                                              "makes .*; raise the server's --max-body-mb"):
            RemoteReward(server.url, TOKEN, attempts=1)(noise[:2], ["x"] * 2)
        assert statuses == [200]  # the /health answer: no image was sent
    with serving(MeanReward()) as server:
        remote = RemoteReward(server.url, TOKEN, attempts=1)
        remote.server_limits()  # asked while the server takes 64 MiB
        server.max_body_bytes = 5_000
        with pytest.raises(RewardError, match="refused a .*-byte request of one image .*413.*--max-body-mb"):
            remote(noise[:2], ["x"] * 2)


def test_a_batch_over_the_servers_pixel_limit_goes_in_parts(monkeypatch):
    """The pixel limit bounds what a batch decodes to, whatever its body's size; /health states it."""
    monkeypatch.setattr("align_diffusion.rewards.server.MAX_BATCH_PIXELS", 3 * 64 * 64)
    noise, statuses = noise_images(8), answered(monkeypatch)
    with serving(MeanReward()) as server:
        assert request(server, "GET", "/health")[1]["max_batch_pixels"] == 3 * 64 * 64
        statuses.clear()
        assert RemoteReward(server.url, TOKEN, attempts=1)(noise, [str(k) for k in range(8)]).tolist() == means(noise)
        assert 400 not in statuses and statuses.count(200) == 1 + 4  # /health, then 8 images in requests of 2
        big = [Image.new("RGB", (128, 128), (9, 9, 9))]  # one image over the limit: the server's refusal names it
        with pytest.raises(RewardError, match="HTTP 400: a batch of 16384 pixels exceeds 12288"):
            RemoteReward(server.url, TOKEN, attempts=1)(big, ["x"])


def drop_the_connection(handler, status, message):
    """A refusal lost: on a slow link the server stops draining the body the client still sends, closes, and the
    reset destroys its answer before the client reads it."""
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def test_refusals_lost_on_a_slow_link_cost_nothing(monkeypatch):
    monkeypatch.setattr(RewardRequestHandler, "reject", drop_the_connection)
    noise = noise_images(8)
    with serving(MeanReward(), max_body_bytes=50_000) as server:
        assert RemoteReward(server.url, TOKEN, attempts=1)(noise, ["x"] * 8).tolist() == means(noise)
        attempts = counted(server, monkeypatch)
        with pytest.raises(RewardError, match="HTTP 401: missing or wrong token \\(answered by its /health\\)"):
            RemoteReward(server.url, "wrong", attempts=3, backoff=0.01)(noise[:1], ["x"])
        assert len(attempts) == 1  # the /health question; no image was sent


def test_nan_travels_as_null_and_back(mean_server):
    images = [Image.new("RGB", (8, 8), (value, value, value)) for value in (0, 51, 255)]
    status, answer = request(mean_server, "POST", "/score", score_body(["a", "nan", "b"], images), AUTH)
    assert status == 200 and answer["rewards"] == [0.0, None, 1.0]
    rewards = RemoteReward(mean_server.url, TOKEN)(images, ["a", "nan", "b"])
    assert rewards[0] == 0 and math.isnan(rewards[1]) and rewards[2] == 1


def test_a_server_restarted_with_another_reward_is_noticed_not_mixed_in():
    images, prompts = [Image.new("RGB", (8, 8), (51, 51, 51))] * 2, ["a", "b"]
    with serving(MeanReward()) as server:
        remote, port = RemoteReward(server.url, TOKEN), server.server_address[1]
        assert remote(images, prompts).tolist() == pytest.approx([0.2, 0.2])
    with serving(MeanReward(), port=port):  # the same reward again: scoring goes on
        assert remote(images, prompts).tolist() == pytest.approx([0.2, 0.2])
    with serving(OverlapReward(), port=port):
        with pytest.raises(RewardError, match="now scores with reward overlap, not mean as it first said"):
            remote(images, prompts)


def test_a_server_restarted_with_another_setting_of_its_reward_is_noticed():
    """`jpeg:50` after `jpeg:5`: both are named `jpeg`, and the client compares the served specs."""
    images, prompts = [Image.new("RGB", (8, 8), (51, 51, 51))] * 2, ["a", "b"]
    with serving(load_reward("jpeg:5")) as server:
        remote, port = RemoteReward(server.url, TOKEN), server.server_address[1]
        assert remote(images, prompts).tolist() == load_reward("jpeg:5")(images, prompts).tolist()
        status, health = request(server, "GET", "/health")  # without a token the name, no server path
        assert health["reward"] == "jpeg" and request(server, "GET", "/health", headers=AUTH)[1]["reward"] == "jpeg:5"
    with serving(load_reward("jpeg:50"), port=port):
        with pytest.raises(RewardError, match="now scores with reward jpeg:50, not jpeg:5 as it first said"):
            remote(images, prompts)
    fresh = RemoteReward(server.url, TOKEN)  # a client that asks /health first, with its token
    with serving(load_reward("jpeg:5"), port=port):
        fresh.server_limits()
    with serving(load_reward("jpeg:50"), port=port):
        with pytest.raises(RewardError, match="now scores with reward jpeg:50, not jpeg:5"):
            fresh(images, prompts)


def test_metadata_reaches_the_reward():
    seen = []

    class Recorder(MeanReward):
        def score(self, images, prompts, metadata):
            seen.append(metadata)
            return super().score(images, prompts, metadata)

    with serving(Recorder()) as server:
        RemoteReward(server.url, TOKEN)([Image.new("RGB", (8, 8))] * 2, ["a", "b"], [{"seed": 1}, {"seed": 2}])
    assert seen == [[{"seed": 1}, {"seed": 2}]]


def test_a_failing_reward_is_500_and_the_client_raises():
    with serving(FlakyReward(failures=10)) as server:
        status, answer = request(server, "POST", "/score", score_body(["a"], [Image.new("RGB", (8, 8))]), AUTH)
        assert status == 500 and "model crashed on call 1" in answer["error"]
        with pytest.raises(RewardError, match="after 2 attempts.*model crashed on call 3"):
            RemoteReward(server.url, TOKEN, attempts=2, backoff=0.01)([Image.new("RGB", (8, 8))], ["a"])


def refused_without_retry(server, monkeypatch, images, prompts, status: int, message: str) -> None:
    """`server` answers the batch with `status` and an error naming `message`, and a client raises at the first
    such answer, without a retry."""
    answer_status, answer = request(server, "POST", "/score", score_body(prompts, images), AUTH)
    assert answer_status == status and message in answer["error"]
    remote = RemoteReward(server.url, TOKEN, attempts=3, backoff=0.01)
    remote.server_limits()  # its /health question, asked before the first batch
    attempts = counted(server, monkeypatch)
    with pytest.raises(RewardError, match=f"HTTP {status}: .*{message}"):
        remote(images, prompts)
    assert len(attempts) == 1


def test_an_infinite_score_is_422_and_not_retried(monkeypatch):
    with serving(InfiniteReward()) as server:  # the same batch would score the same again
        refused_without_retry(server, monkeypatch, [Image.new("RGB", (8, 8))], ["a"], 422, "infinite score")


def test_input_the_reward_refuses_is_400_and_not_retried(monkeypatch):
    from align_diffusion.rewards.simple import ShapesReward

    with serving(ShapesReward()) as server:
        refused_without_retry(server, monkeypatch, [Image.new("RGB", (64, 64))], ["a photo of a cat"], 400, "refused")


def test_client_retries_a_failed_attempt_and_then_succeeds():
    reward = FlakyReward(failures=1)
    with serving(reward) as server:
        rewards = RemoteReward(server.url, TOKEN, attempts=3, backoff=0.01)([Image.new("RGB", (8, 8))] * 2, ["a"] * 2)
    assert rewards.tolist() == [1.0, 1.0] and reward.calls == 2


class Scripted:
    """A stand-in server that answers each request with the next (status, body) of a script and counts requests."""

    def __init__(self, script):
        self.script, self.hits = list(script), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                status, body, *headers = outer.script[min(outer.hits, len(outer.script) - 1)]
                outer.hits += 1
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in (headers[0] if headers else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_503_then_success_is_retried():
    scripted = Scripted([(503, {"error": "busy"}), (200, {"rewards": [0.25, None]})])
    try:
        rewards = RemoteReward(scripted.url, TOKEN, attempts=3, backoff=0.01)([Image.new("RGB", (8, 8))] * 2, ["a"] * 2)
    finally:
        scripted.close()
    assert scripted.hits == 2 and rewards[0] == 0.25 and math.isnan(rewards[1])


@pytest.mark.parametrize("status,body", [
    (200, {"scores": [1, 2]}),
    (200, {"rewards": [1.0]}),
    (200, {"rewards": ["1.0", 2.0]}),
    (200, {"rewards": [True, 2.0]}),
    (200, {"rewards": {"0": 1.0, "1": 2.0}}),
    (200, b"<html>not json</html>"),
    (200, b'{"rewards": [Infinity, 1.0]}'),
    (200, b'{"rewards": [NaN, 1.0]}'),
    (200, b'{"rewards": [1e39, 1.0]}'),  # finite in float64, infinite as the float32 it becomes
    (200, b'{"rewards": [' + b"9" * 400 + b', 1.0]}'),  # an integer beyond any float
    (200, b'{"rewards": [' + b"9" * 5000 + b', 1.0]}'),  # an integer beyond what Python's int reads
    (400, {"error": "nope"}),
])
def test_malformed_answers_and_4xx_raise_without_retry(status, body):
    scripted = Scripted([(status, body)])
    try:
        with pytest.raises(RewardError, match=scripted.url):
            RemoteReward(scripted.url, TOKEN, attempts=3, backoff=0.01)([Image.new("RGB", (8, 8))] * 2, ["a"] * 2)
    finally:
        scripted.close()
    assert scripted.hits == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_error_and_the_token_goes_nowhere_else(status):
    elsewhere = Scripted([(200, {"rewards": [0.5, 0.5]})])
    redirecting = Scripted([(status, b"", {"Location": f"{elsewhere.url}/score"})])
    try:
        with pytest.raises(RewardError, match=f"HTTP {status}"):
            RemoteReward(redirecting.url, TOKEN, attempts=3, backoff=0.01)([Image.new("RGB", (8, 8))] * 2, ["a"] * 2)
    finally:
        redirecting.close()
        elsewhere.close()
    assert redirecting.hits == 1 and elsewhere.hits == 0


def test_client_times_out_on_a_stalled_server_without_queueing_retries_behind_it(monkeypatch):
    reward = StallReward()
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    with serving(reward) as server:
        remote = RemoteReward(server.url, TOKEN, attempts=2, backoff=0.05)
        remote.server_limits()  # its /health question, asked before the first batch
        attempts = counted(server, monkeypatch)
        try:
            # Without the timeout the first attempt would wait for `release` and then get a 200 answer.
            with pytest.raises(RewardError, match=f"sent no answer within 0.5 s.*{TIMEOUT_ENV}=SECONDS"):
                remote([Image.new("RGB", (8, 8))], ["a"])
        finally:
            reward.release.set()
        assert reward.entered.is_set() and len(attempts) == 1  # the server was still scoring: no second request
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=f"{TIMEOUT_ENV} must be a number of seconds, got 'soon'"):
        RemoteReward("http://127.0.0.1:9", TOKEN)


def test_a_server_that_accepts_but_never_answers_costs_one_timeout_a_call():
    listener, accepted = socket.create_server(("127.0.0.1", 0)), []
    listener.settimeout(0.1)

    def accept_and_hold():
        while not stopped.is_set():
            try:
                accepted.append(listener.accept()[0])  # held open, never answered
            except TimeoutError:
                pass

    stopped = threading.Event()
    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    try:
        remote = RemoteReward(f"http://127.0.0.1:{listener.getsockname()[1]}", TOKEN, timeout=0.3, attempts=3)
        for _ in range(2):
            with pytest.raises(RewardError, match=r"did not answer its /health question within 0.3 s \(a server busy "
                                                  "scoring answers it at once"):
                remote([Image.new("RGB", (8, 8))], ["a"])
    finally:
        stopped.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()
    assert len(accepted) == 2  # one /health question a call, and no image sent after it went unanswered


def test_an_answer_trickled_a_byte_at_a_time_is_cut_off_at_the_timeout():
    """Each read gets its byte within the socket's timeout: only a deadline for the whole answer ends the wait."""
    stopped = threading.Event()

    class Trickling(BaseHTTPRequestHandler):
        def do_GET(self):  # /health answers at once
            body = json.dumps({"status": "ok", "authorized": True}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            while not stopped.is_set():  # 1000 bytes at 10 a second: 100 s
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        remote = RemoteReward(f"http://127.0.0.1:{server.server_address[1]}", TOKEN, timeout=0.5, attempts=2)
        started = time.monotonic()
        with pytest.raises(RewardError, match="sent no answer within 0.5 s"):
            remote([Image.new("RGB", (8, 8))], ["a"])
        assert time.monotonic() - started < 10
    finally:
        stopped.set()
        server.shutdown()
        server.server_close()


KILLABLE_SERVER = f"""
import threading, torch
from align_diffusion.rewards.base import Reward
from align_diffusion.rewards.server import make_server

class Hang(Reward):
    def score(self, images, prompts, metadata):
        print("scoring", flush=True)
        threading.Event().wait()

server = make_server(Hang("hang"), token={TOKEN!r})
print(server.url, flush=True)
server.serve_forever()
"""


def test_server_killed_mid_batch_raises_and_returns_nothing():
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_SERVER], cwd=Path(__file__).parents[1],
                               stdout=subprocess.PIPE, text=True)
    outcome = {}

    def call():
        try:
            outcome["rewards"] = RemoteReward(url, TOKEN, timeout=20, attempts=2, backoff=0.05)(
                [Image.new("RGB", (8, 8))] * 4, ["a"] * 4)
        except RewardError as error:
            outcome["error"] = error

    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        client = threading.Thread(target=call)
        client.start()
        assert process.stdout.readline().strip() == "scoring"
        process.kill()
        client.join(timeout=10)
        assert not client.is_alive()
    finally:
        process.kill()
        process.wait()
    assert "rewards" not in outcome and url in str(outcome["error"])


def test_scoring_is_serialized_across_requests():
    reward = OverlapReward()
    with serving(reward) as server:
        remote = RemoteReward(server.url, TOKEN, attempts=1)
        scored, errors = [], []

        def request():
            try:
                scored.append(remote([Image.new("RGB", (8, 8))], ["a"]).tolist())
            except Exception as error:  # noqa: BLE001 - collected for the assertion below
                errors.append(repr(error))

        threads = [threading.Thread(target=request) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == [] and scored == [[0.0]] * 6  # every request scored, one at a time
    assert reward.most == 1


def test_load_2000_requests_from_8_threads_without_error(mean_server):
    images = [Image.new("RGB", (8, 8), (value, value, value)) for value in range(256)]
    errors, correct, per_thread = [], [], 250

    def worker(offset):
        remote = RemoteReward(mean_server.url, TOKEN, attempts=1)  # no retries: every failure counts
        for k in range(per_thread):
            value = (offset * per_thread + k) % 256
            try:
                rewards = remote([images[value]], ["a"])
            except RewardError as error:
                errors.append(repr(error))
                continue
            if rewards.tolist() == [pytest.approx(value / 255)]:
                correct.append(value)
            else:
                errors.append(f"request {value}: got {rewards.tolist()}")

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(8)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    print(f"\nreward server load test: {8 * per_thread} requests from 8 threads in {seconds:.2f} s, "
          f"{8 * per_thread / seconds:.0f} requests/s")
    assert errors == [] and len(correct) == 8 * per_thread  # any other exception ends a worker early


def test_remote_spec_reads_the_token_from_the_environment(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    reward = load_reward("remote:http://127.0.0.1:8000")
    assert isinstance(reward, RemoteReward) and reward.token == "from-env" and not reward.differentiable
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ValueError, match=TOKEN_ENV):
        load_reward("remote:http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        RemoteReward("127.0.0.1:8000", "t")


def test_a_token_read_from_a_file_works_and_a_bad_one_is_refused_without_being_shown(shapes_server, monkeypatch):
    # A secret file ends in a newline, which no HTTP header can carry: both ends drop the whitespace around it.
    monkeypatch.setenv(TOKEN_ENV, TOKEN + "\n")
    assert load_reward(f"remote:{shapes_server.url}")(world_images(), PROMPTS).shape == (len(PROMPTS),)
    with serving(ShapesReward(), token=f"  {TOKEN}\n") as server:
        assert RemoteReward(server.url, TOKEN)(world_images(), PROMPTS).shape == (len(PROMPTS),)
    for token in ("sécret-€", "new\nline"):
        for build in (lambda: RemoteReward(shapes_server.url, token), lambda: make_server(ShapesReward(), token=token)):
            with pytest.raises(ValueError, match="the reward token must be printable ASCII") as refused:
                build()
            assert token not in str(refused.value)


def test_a_reward_that_trains_or_keeps_state_is_not_served():
    with pytest.raises(ValueError, match="adv-dino:assets/world/dino trains, keeps state or needs reference images"):
        make_server(load_reward("adv-dino:assets/world/dino"), token=TOKEN)


def test_serve_reward_refuses_to_start_without_a_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit, match=f"no token; pass --token or set {TOKEN_ENV}"):
        main(["serve-reward", "--reward", "shapes", "--port", "0"])


def test_serve_reward_names_a_bad_token_or_body_limit_before_loading_the_reward(monkeypatch):
    """They were found once the reward had loaded (minutes for a large one), the limit by its internal name."""
    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(SystemExit, match="serve-reward: --token: the reward token must be printable ASCII"):
        main(["serve-reward", "--reward", "shapes", "--port", "0", "--token", "sé cret"])
    monkeypatch.setenv(TOKEN_ENV, "   ")
    with pytest.raises(SystemExit, match=rf"serve-reward: \${TOKEN_ENV}: the reward token is empty"):
        main(["serve-reward", "--reward", "shapes", "--port", "0"])
    with pytest.raises(SystemExit, match="--max-body-mb: 1e-09 MB is less than one byte"):
        main(["serve-reward", "--reward", "shapes", "--port", "0", "--token", TOKEN, "--max-body-mb", "1e-9"])


def test_serve_reward_names_a_port_in_use_before_loading_the_reward(monkeypatch):
    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", lambda *args, **kwargs: pytest.fail("loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            main(["serve-reward", "--reward", "shapes", "--port", str(port), "--token", TOKEN])
    with pytest.raises(SystemExit, match=r"^align-diffusion serve-reward: cannot listen on ::1:0: .*\(--host takes "
                                         r"an IPv4 address of this machine or its name: the server listens on IPv4 "
                                         r"only\)$"):
        main(["serve-reward", "--reward", "shapes", "--host", "::1", "--port", "0", "--token", TOKEN])
