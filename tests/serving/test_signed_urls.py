"""With WARN_API_KEY set, the overlay URLs /v1/predict returns are signed, so that <img> tags open them."""

import time

import pytest

from service.auth import UrlSigner
from service.errors import Unauthorized
from tests.serving.conftest import ROOT, make_client

KEY = {"authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def photo() -> bytes:
    return (ROOT / "docs" / "digit.png").read_bytes()


@pytest.fixture(scope="module")
def keyed(model_path):
    with make_client(model_path, API_KEY="s3cret", STORE="memory", STORE_TTL_S=600, GRPC_PORT=0) as c:
        yield c


def predict(c, photo, headers=KEY) -> dict:
    r = c.post("/v1/predict", content=photo, headers={"content-type": "image/png", **headers})
    assert r.status_code == 200, r.text
    return r.json()


def test_signed_urls_open_their_prediction_without_the_key(keyed, photo):
    answer = predict(keyed, photo)
    urls = answer["attention_urls"]
    query = urls["combined"].split("?")[1]
    assert all(u.endswith(f".png?{query}") for u in urls.values())
    for url in urls.values():
        r = keyed.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # a dashboard adds its own drawing parameters; the signature covers the prediction, not them
    r = keyed.get(urls["0"].replace(".png?", ".webp?") + "&head=1&max_size=64&mode=heatmap")
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert keyed.head(urls["combined"]).status_code == 200
    stored = keyed.get(f"/v1/predictions/{answer['id']}?{query}")
    assert stored.status_code == 200 and stored.json()["attention_urls"] == urls
    # revalidation, as a browser does for <img>: 304 with the signature too
    etag = keyed.get(urls["combined"]).headers["etag"]
    assert keyed.get(urls["combined"], headers={"if-none-match": etag}).status_code == 304


def test_a_signature_opens_nothing_else(keyed, photo):
    first, second = predict(keyed, photo), predict(keyed, photo)
    query = first["attention_urls"]["combined"].split("?")[1]
    other = second["attention_urls"]["combined"].split("?")[0]

    def refused(r, says: str) -> None:
        assert r.status_code == 401 and r.json()["code"] == "unauthorized" and says in r.json()["error"], r.text

    refused(keyed.get(f"{other}?{query}"), "does not match")  # another prediction's
    expires = query.split("&")[0].removeprefix("expires=")
    later = query.replace(expires, str(int(expires) + 86400))  # its own, made to last a day longer
    refused(keyed.get(first["attention_urls"]["combined"].split("?")[0] + f"?{later}"), "does not match")
    refused(keyed.get(f"{other}?{query.split('&')[1]}"), "both 'expires' and 'signature'")
    refused(keyed.get(other), "signed URL that /v1/predict returned")
    refused(keyed.post(f"/v1/predict?{query}", content=photo, headers={"content-type": "image/png"}), "API key")
    refused(keyed.get(f"/v1/model?{query}"), "API key")
    # a wrong key is refused even beside a good signature: the key, when sent, decides
    refused(keyed.get(first["attention_urls"]["combined"], headers={"authorization": "Bearer nope"}), "API key")
    # signed under another API key (a rotated one): refused
    foreign = UrlSigner(["old-key"], 600).query(first["id"])
    refused(keyed.get(f"/v1/predictions/{first['id']}?{foreign}"), "does not match")
    for bad in ("expires=-1&signature=x", "expires=abc&signature=x", f"expires=1&signature={'x' * 65}"):
        assert keyed.get(f"/v1/predictions/{first['id']}?{bad}").status_code == 422


def test_an_expired_signature_is_refused(keyed, photo):
    answer = predict(keyed, photo)
    signer = keyed.app.state.signer
    stale = signer.query(answer["id"], now=time.time() - 601)  # signed at a time past the store's TTL
    r = keyed.get(f"/v1/predictions/{answer['id']}/attention/combined.png?{stale}")
    assert r.status_code == 401 and "expired" in r.json()["error"]
    fresh = signer.query(answer["id"])
    assert keyed.get(f"/v1/predictions/{answer['id']}/attention/combined.png?{fresh}").status_code == 200


OVERLAY = "/v1/predictions/{prediction_id}/attention/{layer}.{ext}"


def query_parameters(c) -> set[str]:
    return {p["name"] for p in c.get("/openapi.json").json()["paths"][OVERLAY]["get"]["parameters"]}


def test_urls_are_plain_without_a_key_or_with_signing_off(model_path, client, keyed, photo):
    assert "?" not in predict(client, photo, headers={})["attention_urls"]["combined"]
    # documented, and parsed, only where signing is on
    assert {"expires", "signature"} <= query_parameters(keyed) and "signature" not in query_parameters(client)
    with make_client(model_path, API_KEY="s3cret", SIGNED_URLS=False, STORE="memory", GRPC_PORT=0) as c:
        answer = predict(c, photo)
        url = answer["attention_urls"]["combined"]
        assert "?" not in url and c.get(url).status_code == 401 and c.get(url, headers=KEY).status_code == 200
        # signing off: a signature made with the same key opens nothing
        forged = UrlSigner(["s3cret"], 600).query(answer["id"])
        assert c.get(f"{url}?{forged}").status_code == 401


def test_a_key_rotates_without_a_cut_over(model_path, photo, tmp_path):
    """During a rotation the previous key, and URLs signed under it, still open; dropping it revokes both."""
    old = UrlSigner(["old"], 600)
    store = {"STORE": "disk", "STORE_DIR": tmp_path, "GRPC_PORT": 0}  # outlives the first app
    with make_client(model_path, API_KEY="new", PREVIOUS_API_KEYS=["old"], **store) as c:
        answer = predict(c, photo, headers={"authorization": "Bearer old"})
        for key, status in (("new", 200), ("old", 200), ("older", 401)):
            assert c.get("/v1/model", headers={"authorization": f"Bearer {key}"}).status_code == status
        pid = answer["id"]
        signed_under_new = answer["attention_urls"]["combined"]  # URLs are signed under the current key
        expires, signature = (p.split("=")[1] for p in signed_under_new.split("?")[1].split("&"))
        UrlSigner(["new"], 600).check(pid, int(expires), signature)
        with pytest.raises(Unauthorized, match="does not match"):
            old.check(pid, int(expires), signature)
        assert c.get(signed_under_new).status_code == 200
        signed_under_old = f"/v1/predictions/{pid}/attention/combined.png?{old.query(pid)}"
        assert c.get(signed_under_old).status_code == 200
    with make_client(model_path, API_KEY="new", **store) as c:  # the rotation is over
        assert c.get(signed_under_new).status_code == 200
        r = c.get(signed_under_old)
        assert r.status_code == 401 and "no longer accepted" in r.json()["error"]
        assert c.get("/v1/model", headers={"authorization": "Bearer old"}).status_code == 401


def test_previous_keys_need_a_current_one():
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="API_KEY, which is not set"):
        Settings(PREVIOUS_API_KEYS=["old"])
    with pytest.raises(ValidationError, match="empty key"):
        Settings(API_KEY="new", PREVIOUS_API_KEYS=[""])
    assert Settings(API_KEY="new", PREVIOUS_API_KEYS=["old"]).api_keys() == ["new", "old"]
