"""Typed, one-line errors of sau-hub. All are SauErrors, so the CLI prints ``error: ...`` and exits non-zero.

:func:`hub_errors` turns huggingface_hub / network exceptions into these (GatedRepoError is a subclass of
RepositoryNotFoundError, so it is caught first)."""
from __future__ import annotations

import contextlib

from sau_core.errors import SauError


class HubError(SauError):
    exit_code = 2
    kind = "hub"


class RepoNotFound(HubError):
    kind = "not-found"


class GatedRepo(HubError):
    kind = "gated"


class RevisionMissing(HubError):
    kind = "revision-missing"


class NoSafetensors(HubError):
    kind = "no-safetensors"


class NetworkError(HubError):
    kind = "network"


class PushRejected(HubError):
    kind = "push-rejected"


class AuthError(HubError):
    kind = "auth"


def server_message(exc) -> str:
    """The Hub's own one-line reason from an HfHubHTTPError (X-Error-Message or the JSON error)."""
    resp = getattr(exc, "response", None)
    msg = ""
    if resp is not None:
        msg = resp.headers.get("X-Error-Message") or ""
        if not msg:
            try:
                msg = str(resp.json().get("error") or "")
            except Exception:  # noqa: BLE001 - a body that is not JSON
                msg = ""
        status = resp.status_code
        msg = f"HTTP {status}" + (f": {msg}" if msg else "")
    else:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return " ".join(msg.split())[:300]


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, pushing: bool = False, endpoint: str = ""):
    """Translate the client's exceptions raised inside the block into sau-hub's typed errors."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except SauError:
        raise
    except GatedRepoError:
        raise GatedRepo(f"{repo_id} is gated: accept its conditions on {endpoint or 'the Hub'}/{repo_id} with the "
                        "account whose token you use (HF_TOKEN or `hf auth login`), then retry") from None
    except RevisionNotFoundError:
        raise RevisionMissing(f"{repo_id} has no revision {revision!r} (branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise RepoNotFound(f"{repo_id} not found on {endpoint or 'the Hub'} (or it is private and your token "
                           "cannot see it)") from None
    except RemoteEntryNotFoundError as exc:
        raise HubError(f"{where}: a file is missing on the Hub ({server_message(exc)})") from None
    except HfHubHTTPError as exc:
        if pushing:
            raise PushRejected(f"the Hub rejected the push to {where} ({server_message(exc)})") from None
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise AuthError(f"the Hub refused the token for {where} (HTTP 401): check HF_TOKEN or `hf auth login`") from None
        raise HubError(f"{where}: {server_message(exc)}") from None
    except LocalEntryNotFoundError as exc:
        raise NetworkError(f"cannot reach the Hub for {where} ({str(exc).splitlines()[0][:200]})") from None
    except (httpx2.HTTPError, ConnectionError, TimeoutError) as exc:
        what = "push to" if pushing else "transfer from"
        raise NetworkError(f"network failure during {what} {where} ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]})") from None
    except OSError as exc:
        if "Consistency check failed" in str(exc):
            raise NetworkError(f"download from {where} was cut short ({str(exc).splitlines()[0][:200]})") from None
        raise
