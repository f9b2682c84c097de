"""Serve any reward over HTTP, so that a trainer on one machine can score with a model loaded on another.

Standard library only. `POST /score` takes `{"prompts": [...], "images": [base64 PNG, ...], "metadata": [...]}`
(metadata optional) with `Authorization: Bearer TOKEN` and answers `{"rewards": [...], "reward": SPEC}`, NaN sent as
null, SPEC the served reward's spec (`jpeg:5`, `clip:/models/clip`), so a client notices a server restarted with
another reward or another setting of it.
`POST /check` takes `{"prompts": [...]}`, `{"height": H, "width": W}` or both, and answers `{}`, or 400 naming the
first prompt, or the size, the reward cannot score (`Reward.check_prompts`, `Reward.check_size`), so that a client
learns it before it makes any image. `GET /health` answers
`{"status": "ok", "reward": NAME, "max_body_bytes": N, "max_batch_pixels": P}` without a token (the reward's
name, `jpeg`, which names fewer of the server's paths than its spec), and with `"authorized": true / false` when a
token comes along (and the spec as `"reward"` when it is taken), so a client learns its limits and its token's
standing before it sends a large body (on a slow link a refused body can reset the connection before the refusal
is read). Errors answer `{"error": MESSAGE}`:
401 bad token, 400 bad request (or input the reward refuses with ValueError), 404 unknown path, 411 no
Content-Length, 413 body too large, 422 the reward returned an infinite score (the same batch would score the same
again), 500 the reward raised anything else or the request failed to parse in a way the server did not foresee.
A query string after a path is ignored.

The token travels in clear over plain HTTP: keep the default 127.0.0.1 and reach the server through an SSH tunnel
(or put a TLS proxy in front) rather than binding a public interface.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import math
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image

from align_diffusion.rewards.base import Reward, RewardError, decoded_batch, eight_bit
from align_diffusion.rewards.remote import checked_token

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096  # a small PNG can inflate to gigabytes; refuse from the header before decoding
# And so can a batch of them: 256 images of 1024², 3 GiB as float32. It also bounds the pixels all requests decode
# at once: a request waits until its batch fits beside those being scored.
MAX_BATCH_PIXELS = 256 * 1024 * 1024


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# PIL's decoders report broken files with SyntaxError, EOFError or struct.error as well as OSError.
UNDECODABLE = (binascii.Error, OSError, ValueError, Image.DecompressionBombError, SyntaxError, EOFError, struct.error)


def open_image(text) -> Image.Image:
    """A PIL image from a base64-encoded PNG (or any format PIL reads), its header read but its pixels not yet
    decoded; RequestError 400 if it is not one, is larger than MAX_IMAGE_PIXELS, or holds more than 8 bits a
    channel (which converting to RGB would clip rather than scale)."""
    if not isinstance(text, str):
        raise RequestError(400, f"images must be base64 strings, got {type(text).__name__}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    except UNDECODABLE as error:
        raise RequestError(400, f"undecodable image: {error}") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise RequestError(400, f"image of {image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
    try:
        return eight_bit(image)
    except ValueError as error:
        raise RequestError(400, str(error)) from None


def decoded(opened: list[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] from images opened by `open_image`, decoded one at a time into the batch (the list
    is emptied as they are, so that no more than one decoded image lives beside it); RequestError 400."""
    count, (width, height) = len(opened), opened[0].size
    try:
        return decoded_batch((opened.pop(0) for _ in range(count)), count, width, height)
    except UNDECODABLE as error:
        raise RequestError(400, f"undecodable image: {error}") from None


def parse_score_request(body: bytes) -> tuple[list[Image.Image], list[str], list[dict] | None]:
    """(images opened but not decoded, prompts, metadata) from a /score body; RequestError 400 on anything
    malformed, on images of different sizes, or on a batch that would decode to more than MAX_BATCH_PIXELS."""
    request = parse_json_object(body)
    missing = [key for key in ("prompts", "images") if key not in request]
    if missing:
        raise RequestError(400, f"missing keys: {missing}")
    prompts, encoded, metadata = checked_prompts(request["prompts"]), request["images"], request.get("metadata")
    if not isinstance(encoded, list):
        raise RequestError(400, "images must be a list of base64 strings")
    if len(prompts) != len(encoded):
        raise RequestError(400, f"{len(prompts)} prompts for {len(encoded)} images")
    if not prompts:
        raise RequestError(400, "empty batch")
    if metadata is not None:
        if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
            raise RequestError(400, "metadata must be a list of objects")
        if len(metadata) != len(prompts):
            raise RequestError(400, f"{len(metadata)} metadata entries for {len(prompts)} images")
    opened = [open_image(text) for text in encoded]
    sizes = {image.size for image in opened}
    if len(sizes) > 1:
        raise RequestError(400, f"images of different sizes in one batch: {sorted(sizes)}")
    pixels = sum(image.width * image.height for image in opened)
    if pixels > MAX_BATCH_PIXELS:
        raise RequestError(400, f"a batch of {pixels} pixels exceeds {MAX_BATCH_PIXELS}; send fewer or smaller images")
    return opened, prompts, metadata


def parse_json_object(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:  # ValueError: undecodable bytes, bad JSON, an integer of 4301 digits
        raise RequestError(400, f"body is not JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "body must be a JSON object")
    return request


def checked_prompts(prompts) -> list[str]:
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "prompts must be a list of strings")
    return prompts


def checked_size(request: dict) -> tuple[int, int]:
    size = request.get("height"), request.get("width")
    if not all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in size):
        raise RequestError(400, "height and width must both be whole numbers >= 1")
    return size


class InfiniteScore(RewardError):
    """The reward scored an image ±inf: a failure that a retry of the batch would repeat."""


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server around one reward; `url` is where it listens."""

    daemon_threads = True  # a request stuck in a reward must not block shutdown
    request_queue_size = 64  # the default backlog of 5 drops connections under a few busy clients

    def __init__(self, reward: Reward, address: tuple[str, int], token: str, max_body_bytes: int):
        token = checked_token(token)
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        if reward.trainable or reward.stateful or reward.needs_reference:
            raise ValueError(f"reward {reward.spec} trains, keeps state or needs reference images, none of which a "
                             "client can reach through the server; score it in the training process instead")
        super().__init__(address, RewardRequestHandler)
        self.reward = reward
        self.token = token.encode()
        self.max_body_bytes = max_body_bytes
        self.score_lock = threading.Lock()  # models are not thread-safe; decoding runs outside it
        self.pixels_in_flight = 0  # of the batches decoded or being decoded, at most MAX_BATCH_PIXELS
        self.room = threading.Condition()

    def handle_error(self, request, client_address):
        logger.warning("request from %s failed", client_address[0], exc_info=sys.exc_info())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @contextlib.contextmanager
    def room_for(self, pixels: int):
        """Wait until a batch of `pixels` fits beside the batches being decoded and scored, and hold its place."""
        with self.room:
            self.room.wait_for(lambda: self.pixels_in_flight == 0 or self.pixels_in_flight + pixels <= MAX_BATCH_PIXELS)
            self.pixels_in_flight += pixels
        try:
            yield
        finally:
            with self.room:
                self.pixels_in_flight -= pixels
                self.room.notify_all()

    def score(self, images: torch.Tensor, prompts: list[str], metadata) -> list[float | None]:
        with self.score_lock, torch.no_grad():
            rewards = self.reward(images, prompts, metadata)
        values = rewards.detach().cpu().double().tolist()
        if any(math.isinf(v) for v in values):
            raise InfiniteScore(f"reward {self.reward.name} returned an infinite score: {values}")
        return [None if math.isnan(v) else v for v in values]


class RewardRequestHandler(BaseHTTPRequestHandler):
    server: RewardServer
    timeout = 60  # seconds a client may take to send its request before the connection is dropped

    def do_GET(self):
        if urllib.parse.urlsplit(self.path).path != "/health":
            return self.reject(404, f"unknown path {self.path}")
        health = {"status": "ok", "reward": self.server.reward.name, "max_body_bytes": self.server.max_body_bytes,
                  "max_batch_pixels": MAX_BATCH_PIXELS}
        if "Authorization" in self.headers:
            health["authorized"] = self.authorized()
            if health["authorized"]:
                health["reward"] = self.server.reward.spec
        self.send_json(200, health)

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path).path
        if path not in ("/score", "/check"):
            return self.reject(404, f"unknown path {self.path}")
        if not self.authorized():
            return self.reject(401, "missing or wrong token")
        length = self.headers.get("Content-Length")
        if length is None:
            return self.reject(411, "Content-Length required")
        try:
            length = int(length)
        except ValueError:
            return self.reject(400, f"bad Content-Length {length!r}")
        if length < 0:
            return self.reject(400, f"bad Content-Length {length}")
        if length > self.server.max_body_bytes:
            return self.reject(413, f"body of {length} bytes exceeds the server's {self.server.max_body_bytes}")
        body = self.rfile.read(length)
        if len(body) < length:
            return self.send_json(400, {"error": f"body ended after {len(body)} of {length} bytes"})
        if path == "/check":
            return self.check(body)
        with contextlib.ExitStack() as place:  # the batch's room is given back before the answer goes
            try:
                opened, prompts, metadata = parse_score_request(body)
                place.enter_context(self.server.room_for(len(opened) * opened[0].width * opened[0].height))
                images = decoded(opened)
            except RequestError as error:
                status, answer = error.status, {"error": str(error)}
            except Exception as error:  # a failure decoding does not know of: answer it rather than hang up
                logger.exception("could not read a /score request")
                status, answer = 500, {"error": f"could not read the request: {error!r}"}
            else:
                status, answer = self.score(images, prompts, metadata)
                del images  # its memory goes with its room
        self.send_json(status, answer)

    def score(self, images: torch.Tensor, prompts: list[str], metadata) -> tuple[int, dict]:
        """The status and answer to a batch."""
        try:
            return 200, {"rewards": self.server.score(images, prompts, metadata), "reward": self.server.reward.spec}
        except ValueError as error:  # the reward refused this input (e.g. a prompt outside its grammar)
            return 400, {"error": f"reward {self.server.reward.name} refused the batch: {error}"}
        except InfiniteScore as error:
            return 422, {"error": str(error)}
        except Exception as error:
            logger.exception("reward %s failed on a batch of %d", self.server.reward.name, len(prompts))
            return 500, {"error": f"reward {self.server.reward.name} failed: {error!r}"}

    def check(self, body: bytes) -> None:
        try:
            request = parse_json_object(body)
            prompts = checked_prompts(request.get("prompts", []))
            size = checked_size(request) if "height" in request or "width" in request else None
        except RequestError as error:
            return self.send_json(error.status, {"error": str(error)})
        try:
            self.server.reward.check_prompts(prompts)
            if size is not None:
                self.server.reward.check_size(*size)
        except ValueError as error:
            return self.send_json(400, {"error": str(error)})
        except Exception as error:
            logger.exception("reward %s failed to check %d prompts", self.server.reward.name, len(prompts))
            return self.send_json(500, {"error": f"reward {self.server.reward.name} failed: {error!r}"})
        self.send_json(200, {})

    def authorized(self) -> bool:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.server.token)

    def reject(self, status: int, message: str) -> None:
        """Answer an error before reading the body, then close the connection without losing the answer."""
        self.send_json(status, {"error": message})
        self.close_connection = True
        # Closing a socket with unread bytes makes the kernel send a reset, which can destroy the answer before
        # the client reads it: signal the end of the answer, then discard what the client sends, for a bounded time.
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.2)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self.connection.recv(65536):
                pass
        except OSError:
            pass

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = 0, *, token: str,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> RewardServer:
    """A server bound to (host, port) and not yet serving: run `serve_forever()` (in a thread, for tests).
    Port 0 picks a free port; read it from `server.url` or `server.server_address`."""
    return RewardServer(reward, (host, port), token, max_body_bytes)


def serve(reward: Reward, host: str = "127.0.0.1", port: int = 8000, *, token: str,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve `reward` until interrupted, printing the URL clients pass as `remote:URL`."""
    server = make_server(reward, host, port, token=token, max_body_bytes=max_body_bytes)
    print(f"serving reward {reward.name} on {server.url} (POST /score, POST /check, GET /health); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
