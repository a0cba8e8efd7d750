"""Profiles over HTTP: ``GET/PUT/DELETE /v1/profiles/{user_id}`` and ``GET /v1/profiles``,
on the same store as ``pj profiles`` (the server's ``--store``).

A profile travels as the JSON ``pj profiles export`` writes for one user. ``PUT`` takes the
fields a user sets (``preferences``, ``description``, ``defaults``, ``metadata``); the user id
comes from the path, and the store keeps ``revision``, ``created_at`` and ``updated_at``. A
``PUT`` that carries the ``revision`` it read (in the body, as ``GET`` returned it, or as an
``If-Match`` header, the ``ETag`` of ``GET``) is refused with a 409 if someone wrote the
profile in between, so a read-modify-write never loses another writer's change.

Example (with ``pj serve`` running)::

    curl -X PUT localhost:8000/v1/profiles/alice -H 'content-type: application/json' \\
         -d '{"preferences": ["humor", "concise"], "defaults": {"max_new_tokens": 128}}'
    curl localhost:8000/v1/profiles/alice
    curl -X DELETE localhost:8000/v1/profiles/alice
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Body, Header, Request, Response

from pj_core.errors import InvalidPersonaError
from pj_core.personas import PersonaProfile
from pj_core.personas.store import AbstractProfileStore
from pj_core.server.auth import Principal

SERVER_FIELDS = ("created_at", "updated_at", "schema_version")
"""Fields a client may echo back from ``GET`` but that the store sets (ignored by ``PUT``)."""


def profile_json(profile: PersonaProfile) -> dict[str, Any]:
    """A profile as the JSON the API returns (as ``pj profiles export`` writes it)."""
    return {"object": "profile", **profile.model_dump(mode="json")}


def expected_revision(if_match: str | None, body: dict[str, Any]) -> int | None:
    """The revision a ``PUT`` was based on: ``If-Match`` (an ETag, quoted or not), else the
    body's ``revision``, else None (the write replaces whatever is stored).

    Raises:
        InvalidPersonaError: a revision that is not a whole number >= 0.

    Example:
        >>> expected_revision('"3"', {}), expected_revision(None, {"revision": 2})
        (3, 2)
    """
    given: object = body.get("revision")
    if if_match is not None:
        given = if_match.strip().removeprefix("W/").strip('"')
    if given is None:
        return None
    if isinstance(given, bool) or not (
        (isinstance(given, int) and given >= 0) or (isinstance(given, str) and given.isdigit())
    ):
        raise InvalidPersonaError(
            f"revision {given!r} is not a revision number; send the revision (or ETag) that "
            "GET returned, or leave it out to replace the profile"
        )
    return int(given)


def profile_from_body(user_id: str, body: dict[str, Any]) -> PersonaProfile:
    """The profile a ``PUT`` body describes, for ``user_id`` (the path's).

    Raises:
        InvalidPersonaError: a body naming another user id, or an invalid profile.
    """
    named = body.get("user_id")
    if named is not None and named != user_id:
        raise InvalidPersonaError(
            f"the body names user_id {named!r} but the path names {user_id!r}; leave user_id "
            "out of the body or make them agree"
        )
    data = {k: v for k, v in body.items() if k not in (*SERVER_FIELDS, "object", "revision")}
    data["user_id"] = user_id
    return PersonaProfile.from_data(data)


def profile_router(
    store: AbstractProfileStore, principal_of: Callable[[Request], Principal]
) -> APIRouter:
    """The ``/v1/profiles`` routes on ``store`` (sync handlers: FastAPI runs them in its
    thread pool, so a busy database never blocks the event loop). ``principal_of`` says who a
    request acts as: a user's key reaches only its own profile, listing needs an admin key."""
    router = APIRouter(prefix="/v1/profiles", tags=["profiles"])

    @router.get("")
    def list_profiles(request: Request) -> dict[str, Any]:
        principal_of(request).check_admin("listing every profile")
        return {"object": "list", "data": [profile_json(p) for p in store.list()]}

    @router.get("/{user_id}")
    def get_profile(user_id: str, request: Request, response: Response) -> dict[str, Any]:
        principal_of(request).check_profile(user_id)
        profile = store.get(user_id)
        response.headers["etag"] = f'"{profile.revision}"'
        return profile_json(profile)

    @router.put("/{user_id}")
    def put_profile(
        user_id: str,
        request: Request,
        response: Response,
        body: dict[str, Any] = Body(...),  # noqa: B008 - FastAPI's way to declare a body
        if_match: str | None = Header(default=None),
    ) -> dict[str, Any]:
        principal_of(request).check_profile(user_id)
        profile = profile_from_body(user_id, body)
        existed = user_id in store
        stored = store.put(profile, expected_revision=expected_revision(if_match, body))
        response.status_code = 200 if existed else 201
        response.headers["etag"] = f'"{stored.revision}"'
        return profile_json(stored)

    @router.delete("/{user_id}", status_code=204)
    def delete_profile(user_id: str, request: Request) -> Response:
        principal_of(request).check_profile(user_id)
        store.delete(user_id)
        return Response(status_code=204)

    return router
