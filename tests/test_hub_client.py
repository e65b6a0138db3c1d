"""``io.hub_client``: the Hub client that downloads and ``push`` share, without a server.

What the two directions answer to a real server is tested end to end in ``test_hub_inputs.py`` and
``test_push.py``; here, the secret rules of the client itself: a token is masked because it was
registered where it entered (``clean_token``), never because a caller passed it to a masker, and no
exception leaves either direction with a token in it or in its causes.
"""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError

from bora_tools import errors
from bora_tools.errors import HubError
from bora_tools.io.hub_client import clean_token, download_errors, upload_errors

TOKEN = "hf_cLiEnTtOkEn1234567890abcdefXYZ"
ENDPOINT = "http://127.0.0.1:9"

DIRECTIONS = {
    "download": lambda: download_errors(endpoint=ENDPOINT, repo_id="org/bora", revision=None, token=None,
                                        spec="org/bora"),
    "upload": lambda: upload_errors(endpoint=ENDPOINT, repo_id="org/bora", revision=None, token=None),
}


@pytest.fixture(autouse=True)
def secrets():
    """Registered secrets are process-wide: leave the set as it was."""
    before = set(errors._SECRETS)
    yield
    errors._SECRETS.clear()
    errors._SECRETS.update(before)


def _server_error(message: str) -> HfHubHTTPError:
    response = httpx2.Response(500, request=httpx2.Request("GET", f"{ENDPOINT}/api/models/org/bora"))
    return HfHubHTTPError(message, response=response, server_message=message)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_a_token_registered_by_clean_token_is_masked_where_the_server_echoes_it(direction):
    assert clean_token(f"{TOKEN}\n") == TOKEN
    with pytest.raises(HubError) as info, DIRECTIONS[direction]():
        raise _server_error(f"bad header Authorization: Bearer {TOKEN}\nretry")
    assert str(info.value) == f"the Hub at {ENDPOINT} answered HTTP 500: bad header Authorization: Bearer *** retry"


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_an_unknown_failure_leaves_with_the_token_masked_in_it_and_every_cause(direction):
    clean_token(TOKEN)
    with pytest.raises(RuntimeError) as info, DIRECTIONS[direction]():
        try:
            raise OSError(f"server echoed: Bearer {TOKEN}")
        except OSError as inner:
            raise RuntimeError(f"request failed with {{'authorization': 'Bearer {TOKEN}'}}") from inner
    cause = info.value.__cause__
    assert str(info.value) == "request failed with {'authorization': 'Bearer ***'}"
    assert isinstance(cause, OSError) and str(cause) == "server echoed: Bearer ***"

