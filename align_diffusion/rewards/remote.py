"""A reward scored by a reward server (server.py) over HTTP. Spec `remote:URL`, e.g. `remote:http://127.0.0.1:8000`.

The token comes from the constructor or the ALIGN_DIFFUSION_REWARD_TOKEN environment variable, the timeout (60 s)
from the constructor or ALIGN_DIFFUSION_REWARD_TIMEOUT. Connection errors and 5xx answers are retried with
exponential backoff; a 4xx answer, a malformed response, a request sent but not answered in time (the server may
still be scoring it: a retry would queue behind it) or the last failed attempt raises RewardError. Before its first
batch the client asks the server's /health whether it takes the token and how large a body, and splits a batch
that is too large before sending it. There is no default score: either every image gets its server's score (NaN
where the server could not score it) or the call raises. `check_prompts` and `check_size` ask the server's /check,
so that a prompt or an image size its reward cannot score fails before any image is made.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from align_diffusion.names import REWARD_TOKEN_ENV
from align_diffusion.rewards.base import Reward, RewardError, images_to_pil

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "ALIGN_DIFFUSION_REWARD_TIMEOUT"
DEFAULT_TIMEOUT = 60.0


class Refused(RewardError):
    """The server answered a request with a 4xx `status`: it would answer the same again."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BatchTooLarge(Refused):
    """The server refused a request as larger than it accepts (413)."""

    def __init__(self, message: str):
        super().__init__(413, message)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is, so the token and images are never sent on to another address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# No proxy and no redirects: the bearer token must go to the server named in the URL and nowhere else.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _RefuseRedirects())


def checked_token(token: str) -> str:
    """`token` without the whitespace around it (a secret read from a file ends in a newline, which no HTTP header
    can carry); ValueError, which never shows the token, when nothing is left or it holds other characters a header
    cannot carry."""
    token = token.strip()
    if not token:
        raise ValueError("the reward token is empty")
    if not (token.isascii() and token.isprintable()):
        raise ValueError("the reward token must be printable ASCII (it is not shown here)")
    return token


def encode_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # encoding time matters more than bytes on a local link
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_rewards(payload: bytes, batch_size: int, url: str) -> tuple[torch.Tensor, str | None]:
    """(B,) float32 from a /score answer, null → NaN, and the reward that scored them as the server names it (its
    spec; its name from older servers; None from one that does not say); RewardError unless it holds exactly B
    numbers finite in float32, or nulls (JSON has no NaN or Infinity; a server that sends them anyway is broken)."""
    malformed = RewardError(f"reward server {url} gave a malformed answer for {batch_size} images: {payload[:200]!r}")
    try:
        answer = json.loads(payload)
        rewards, name = answer["rewards"], answer.get("reward")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # ValueError: bytes, JSON, int digits
        raise malformed from None
    if not (isinstance(rewards, list) and len(rewards) == batch_size and all(
            value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) for value in rewards)):
        raise malformed
    try:
        scores = torch.tensor([math.nan if value is None else float(value) for value in rewards], dtype=torch.float32)
    except OverflowError:  # an integer beyond any float
        raise malformed from None
    if not (torch.isfinite(scores) | torch.tensor([value is None for value in rewards], dtype=torch.bool)).all():
        raise malformed
    return scores, name if isinstance(name, str) else None


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's {"error": ...} text, or the start of whatever body came with the status."""
    try:
        body = error.read()
    except (OSError, http.client.HTTPException):
        return error.reason
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace") or str(error.reason)


def read_by(response, deadline: float) -> bytes:
    """The body of an answer, read in pieces; TimeoutError once the `deadline` (time.monotonic) has passed, so a
    server that trickles its answer is cut off as one that sends none (the socket's timeout bounds each read only)."""
    pieces = []
    while piece := response.read1(1 << 16):
        pieces.append(piece)
        if time.monotonic() > deadline:
            raise TimeoutError
    return b"".join(pieces)


class RemoteReward(Reward):
    """The score of a reward server at `url`. `timeout` is in seconds for each answer, from the request to its last
    byte, `attempts` counts the first try, `backoff` is the first wait between attempts (doubled after each)."""

    differentiable = False  # only numbers come back

    def __init__(self, url: str, token: str | None = None, *, timeout: float | None = None, attempts: int = 3,
                 backoff: float = 0.5):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise ValueError(f"remote reward URL must look like http://HOST:PORT, got {url!r}")
        if "@" in parts.netloc:  # urllib would read it as part of the host name, and messages would show it
            raise ValueError(f"remote reward URL: a user or password in the URL is not sent (the server takes the "
                             f"token, {REWARD_TOKEN_ENV}); give http://HOST:PORT, got {parts.scheme}://…@{parts.hostname}")
        token = token or os.environ.get(REWARD_TOKEN_ENV)
        if not token:
            raise ValueError(f"remote reward {url}: no token; pass token= or set {REWARD_TOKEN_ENV}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        if timeout is None:
            try:
                timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
            except ValueError:
                given = os.environ[TIMEOUT_ENV]
                raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {given!r}") from None
        if not 0 < timeout < math.inf:
            raise ValueError(f"the reward server timeout must be a finite number of seconds > 0, got {timeout}")
        super().__init__(f"remote:{url}")
        self.url = url
        self.parts = parts._replace(path=parts.path.rstrip("/"))
        self.token = checked_token(token)
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.health: dict | None = None  # the server's /health answer, once one came
        self.scored_by: str | None = None  # the reward (spec) the server first named

    def endpoint(self, name: str) -> str:
        """The URL of the server's `name` (`score`, `health`, `check`), keeping the given URL's path and query."""
        return urllib.parse.urlunsplit(self.parts._replace(path=f"{self.parts.path}/{name}"))

    def check_prompt_list(self, prompts):
        """ValueError naming the first of `prompts` the server's reward cannot score (its POST /check, asked with
        each distinct prompt once, in requests the size its /health allows); a server without /check (404) checks
        nothing, which is logged (`checked`)."""
        limit = self.server_limits()[0]
        chunks, chunk, size = [], [], len('{"prompts": []}')
        for prompt in dict.fromkeys(prompts):
            cost = len(json.dumps(prompt)) + len(", ")
            if chunk and limit is not None and size + cost > limit:
                chunks.append(chunk)
                chunk, size = [], len('{"prompts": []}')
            chunk.append(prompt)
            size += cost
        for chunk in chunks + [chunk]:
            if not self.checked({"prompts": chunk}, f"request of {len(chunk)} prompt" + "s" * (len(chunk) != 1)):
                return

    def check_size(self, height, width):
        """ValueError when the server's reward cannot score `height` × `width` images (its POST /check)."""
        # with no prompts to check, which a server older than the size check requires
        self.checked({"prompts": [], "height": height, "width": width}, f"size check of {height}×{width}")

    def checked(self, request: dict, what: str) -> bool:
        """Asks the server's /check about `request`: ValueError with its answer where its reward refuses it; False
        (and a warning) for a server without /check."""
        try:
            self.post("check", json.dumps(request).encode(), what)
        except Refused as error:
            if error.status == 400:
                raise ValueError(str(error)) from None
            if error.status != 404:
                raise
            logger.warning("reward server %s has no /check: its reward did not check the prompts or image size "
                           "before the first image; what it cannot score fails at its first batch", self.url)
            return False
        return True

    def score(self, images, prompts, metadata):
        images = images_to_pil(images)
        return self._scored([encode_png(image) for image in images], prompts,
                            None if metadata is None else list(metadata), images[0].width * images[0].height,
                            self.server_limits())

    def _scored(self, images: list[str], prompts: list[str], metadata: list | None, image_pixels: int,
                limits: tuple[int | None, int | None]) -> torch.Tensor:
        """Scores of PNG-encoded images of `image_pixels` pixels each; a batch larger than the server takes (in
        bytes or pixels, as `limits` from its /health say, or in bytes as it answers) goes in two halves (images
        are scored one by one, so the halves score as the whole would)."""
        request = {"prompts": prompts, "images": images, **({} if metadata is None else {"metadata": metadata})}
        try:
            body = json.dumps(request, allow_nan=False).encode()
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.name}: metadata must be plain JSON to reach a reward server: {error}") from None
        limit, pixel_limit = limits
        if limit is not None and len(body) > limit and len(images) == 1:
            raise BatchTooLarge(f"reward server {self.url} takes requests of up to {limit} bytes (its /health), "
                                f"and one image makes {len(body)}; raise the server's --max-body-mb")
        # One image over the pixel limit goes as it is: the server's refusal names its size.
        if (limit is None or len(body) <= limit) and (
                pixel_limit is None or len(images) * image_pixels <= pixel_limit or len(images) == 1):
            try:
                scores, name = parse_rewards(self.post("score", body, "request of one image"), len(prompts), self.url)
                self.check_reward_name(name)
                return scores
            except BatchTooLarge:
                if len(images) == 1:
                    raise
        half = len(images) // 2
        parts = [slice(None, half), slice(half, None)]
        return torch.cat([self._scored(images[part], prompts[part], None if metadata is None else metadata[part],
                                       image_pixels, limits) for part in parts])

    def check_reward_name(self, name: str | None) -> None:
        """RewardError when the server names another reward than it first did (in /health or an earlier answer): one
        restarted with another reward, or another setting of it (`jpeg:50` for `jpeg:5`), on the same address would
        mix two rewards' scores in one run."""
        if name is None:
            return
        first = self.scored_by or (self.health or {}).get("reward")
        if isinstance(first, str) and name != first:
            raise RewardError(f"reward server {self.url} now scores with reward {name}, not {first} as it first said "
                              "(restarted with another reward?); scores of two rewards must not mix")
        self.scored_by = first if isinstance(first, str) else name

    def server_limits(self) -> tuple[int | None, int | None]:
        """(max_body_bytes, max_batch_pixels) as the server's /health states them, None for a limit it does not
        state. /health is asked (with the token) until it answers: on a slow link a body the server refuses can
        reset the connection before its refusal is read, so the size and the token are checked before a batch
        goes. RewardError when /health refuses the token or sends no answer in time; an unreachable server is left
        to the request's own retries and errors."""
        if self.health is None:
            deadline = time.monotonic() + self.timeout
            request = urllib.request.Request(self.endpoint("health"), headers={"Authorization": f"Bearer {self.token}"})
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    health = json.loads(read_by(response, deadline))
            except urllib.error.HTTPError as error:  # it answered: with nothing to say, or failing for now
                if error.code >= 500 and error.code != 501:
                    return None, None
                health = {}
            except TimeoutError:
                raise RewardError(f"reward server {self.url} did not answer its /health question within "
                                  f"{self.timeout:g} s (a server busy scoring answers it at once; a slow link needs a "
                                  f"longer timeout: {TIMEOUT_ENV}=SECONDS)") from None
            except (OSError, http.client.HTTPException, ValueError, RecursionError):
                return None, None
            self.health = health if isinstance(health, dict) else {}
        if self.health.get("authorized") is False:
            raise RewardError(f"reward server {self.url}: HTTP 401: missing or wrong token (answered by its /health)")
        return tuple(limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
                     for limit in (self.health.get("max_body_bytes"), self.health.get("max_batch_pixels")))

    def post(self, name: str, body: bytes, what: str) -> bytes:
        """The body of a 200 answer to POST /`name`, after up to `attempts` tries; Refused for a 4xx answer, and
        BatchTooLarge, naming `what` the body holds, for a 413."""
        request = urllib.request.Request(
            self.endpoint(name), data=body, method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        for attempt in range(1, self.attempts + 1):
            try:
                deadline = time.monotonic() + self.timeout
                with _OPENER.open(request, timeout=self.timeout) as response:
                    return read_by(response, deadline)
            except urllib.error.HTTPError as error:
                cause = f"HTTP {error.code}: {_error_message(error)}"
                if error.code == 413:
                    raise BatchTooLarge(f"reward server {self.url} refused a {len(body)}-byte {what} ({cause}); "
                                        "raise the server's --max-body-mb") from None
                if error.code < 500:
                    raise Refused(error.code, f"reward server {self.url}: {cause}") from None
            except TimeoutError:  # raised bare while waiting for the answer (urllib wraps errors while sending)
                raise RewardError(f"reward server {self.url} sent no answer within {self.timeout:g} s; it may still be "
                                  "scoring the batch, so a retry would only queue behind it. A slow reward needs a "
                                  f"longer timeout: {TIMEOUT_ENV}=SECONDS") from None
            except (OSError, http.client.HTTPException) as error:  # URLError, resets, cut answers
                cause = f"{type(error).__name__}: {error}"
            if attempt < self.attempts:
                delay = self.backoff * 2 ** (attempt - 1)
                logger.warning("reward server %s, attempt %d of %d failed (%s); retrying in %.2f s",
                               self.url, attempt, self.attempts, cause, delay)
                time.sleep(delay)
        raise RewardError(f"reward server {self.url} failed after {self.attempts} attempts: {cause}")
