"""The HTTP routes, declared once.

:func:`~._app.build_app` makes the Starlette routes from :data:`ENDPOINTS` and
:func:`~._openapi.openapi_document` makes the OpenAPI ``paths`` from it, so a
route, its methods, its parameters' bounds and its documented answers cannot
drift apart. The handlers read their parameters through the same declarations
(:data:`LIMIT`, :data:`WAIT_TIMEOUT`, ...).

Each endpoint names the :class:`Role` an API key needs to call it (see
:mod:`._auth`); the websocket's is :data:`SUBSCRIBE_ROLES`.

This module is data only: it imports no web framework. The websocket route
``/subscribe`` is not here; it is not part of the OpenAPI document.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from .._models import MAX_WAIT_SECONDS, WaitRequest
from .._states import TaskRunState

__all__ = [
    "ADMIN_ONLY",
    "AFTER",
    "ANY_ROLE",
    "BLOB_ID",
    "BYTES",
    "ENDPOINTS",
    "EPOCH",
    "FEED_ID",
    "LIMIT",
    "OFFSET",
    "PUBLIC",
    "RUN_ID",
    "STATE",
    "SUBSCRIBE_ROLES",
    "TAG",
    "TASK_KEY",
    "UI_PREFIX",
    "WAIT_TIMEOUT",
    "Endpoint",
    "Param",
    "PathId",
    "QueryNumber",
    "QueryText",
    "Reply",
    "Role",
]

#: Where the dashboard's files are served (see ``_ui``); every path under it is
#: public: the files hold no data, the page asks the API for it with a key.
UI_PREFIX = "/ui"

#: A body of raw bytes, where a body is otherwise named by its JSON schema.
BYTES = "application/octet-stream"


class Role(enum.StrEnum):
    """What an API key may do. A key given without roles holds all three."""

    #: Create runs, read and wait for them by id, cancel them, store and read blobs.
    SUBMIT = "submit"
    #: Subscribe over the websocket and store and read the blobs of the runs it runs.
    WORK = "work"
    #: Everything, listing every run included.
    ADMIN = "admin"


#: An endpoint's ``roles`` when it needs no key, even on a server that has keys.
PUBLIC: frozenset[Role] = frozenset()
#: Any valid key, whatever its roles.
ANY_ROLE: frozenset[Role] = frozenset(Role)
#: Only keys with the admin role; also what an endpoint that names no roles needs,
#: so a route added without a thought for keys is closed rather than open.
ADMIN_ONLY: frozenset[Role] = frozenset({Role.ADMIN})
#: The roles that may open the ``/subscribe`` websocket.
SUBSCRIBE_ROLES: frozenset[Role] = frozenset({Role.WORK})


@attrs.frozen(kw_only=True)
class PathId:
    """A path parameter holding a UUID."""

    name: str


@attrs.frozen(kw_only=True)
class QueryText:
    """An optional query parameter: any string, or one of the values of ``choices``."""

    name: str
    choices: type[enum.Enum] | None = None


@attrs.frozen(kw_only=True)
class QueryNumber:
    """An optional numeric query parameter; the handler enforces these bounds."""

    name: str
    default: float
    minimum: float
    maximum: float
    #: Documented as an integer; the handler truncates what it reads.
    integer: bool = False


Param = PathId | QueryText | QueryNumber


@attrs.frozen(kw_only=True)
class Reply:
    """One documented answer: ``body`` names a component schema (JSON), or is
    :data:`BYTES`, or ``None`` for a body the document does not describe."""

    description: str
    body: str | None = None


@attrs.frozen(kw_only=True)
class Endpoint:
    """One method on one path: how it is served and how it is documented.

    ``handler`` names the method of the app's handlers that answers it.
    ``body`` is the request body, named as in :class:`Reply`. On a server with
    API keys, a key holding any one of ``roles`` may call it (``admin`` holds
    them all); :data:`PUBLIC` needs no key.
    """

    method: str
    path: str
    handler: str
    operation_id: str
    summary: str
    replies: Mapping[int, Reply]
    params: tuple[Param, ...] = ()
    body: str | None = None
    roles: frozenset[Role] = ADMIN_ONLY


RUN_ID = PathId(name="run_id")
BLOB_ID = PathId(name="blob_id")
STATE = QueryText(name="state", choices=TaskRunState)
TASK_KEY = QueryText(name="task_key")
TAG = QueryText(name="tag")
LIMIT = QueryNumber(name="limit", default=200, minimum=1, maximum=1000, integer=True)
# The store keeps offsets in a signed 64-bit SQLite integer.
OFFSET = QueryNumber(name="offset", default=0, minimum=0, maximum=2**62, integer=True)
WAIT_TIMEOUT = QueryNumber(
    name="timeout",
    # The same default as the body of POST /runs/wait.
    default=WaitRequest(ids=()).timeout,
    minimum=0.0,
    maximum=MAX_WAIT_SECONDS,
)

FEED_ID = PathId(name="feed_id")
EPOCH = QueryNumber(name="epoch", default=0, minimum=0, maximum=2**53, integer=True)
AFTER = QueryNumber(name="after", default=0, minimum=0, maximum=2**62, integer=True)

_SUBMIT = frozenset({Role.SUBMIT})
# A submitter stores large parameters and reads large results; a worker the reverse.
_SUBMIT_OR_WORK = frozenset({Role.SUBMIT, Role.WORK})

_MALFORMED = Reply(description="The request is malformed; `detail` says how.", body="Error")
_NO_RUN = Reply(description="No such run.", body="Error")
_THE_RUN = Reply(description="The run", body="TaskRun")
#: What any route with a body may answer while reading it (see ``_app._body``).
_BODY_LIMITS = {
    408: Reply(description="The body did not arrive within the server's time.", body="Error"),
    413: Reply(description="The body is larger than the server accepts.", body="Error"),
    503: Reply(
        description="The server holds too many large bodies right now; retry after "
        "`Retry-After` seconds.",
        body="Error",
    ),
}

#: Every HTTP route, in matching order (``/runs/wait`` before ``/runs/{run_id}``).
ENDPOINTS = (
    Endpoint(
        method="GET",
        path="/health",
        handler="health",
        roles=PUBLIC,
        operation_id="health",
        summary="Server health and run counts per state",
        replies={200: Reply(description="Healthy", body="Health")},
    ),
    Endpoint(
        method="POST",
        path="/runs",
        handler="create_runs",
        roles=_SUBMIT,
        operation_id="createRuns",
        summary="Create one or many runs in one transaction",
        body="TaskRunCreateBatch",
        replies={
            201: Reply(description="Created", body="CreatedRuns"),
            404: Reply(
                description="A `parameters_ref` names no stored blob; no run was created.",
                body="Error",
            ),
            409: Reply(
                description="The `Idempotency-Key` was used before with another body.",
                body="Error",
            ),
            422: _MALFORMED,
            **_BODY_LIMITS,
        },
    ),
    Endpoint(
        method="POST",
        path="/feeds/{feed_id}/watch",
        handler="watch_feed",
        roles=_SUBMIT,
        operation_id="watchFeed",
        summary="Make a client's feed watch runs (the feed is made if it does not exist)",
        params=(FEED_ID,),
        body="FeedWatch",
        replies={
            200: Reply(
                description="The feed's epoch, and the ids naming no run", body="FeedWatched"
            ),
            409: Reply(
                description="The feed (or all feeds together) watch as many runs as they"
                " may, or another API key has a feed under this id: wait for these runs"
                " another way.",
                body="Error",
            ),
            422: _MALFORMED,
            **_BODY_LIMITS,
        },
    ),
    Endpoint(
        method="GET",
        path="/feeds/{feed_id}",
        handler="poll_feed",
        roles=_SUBMIT,
        operation_id="pollFeed",
        summary="The runs of a client's feed that ended after `after`; waits up to"
        " `timeout` for one",
        params=(FEED_ID, EPOCH, AFTER, WAIT_TIMEOUT),
        replies={
            200: Reply(
                description="Ended runs (none after the timeout) and the next cursor",
                body="FeedPage",
            ),
            404: Reply(
                description="This server has no such feed of this epoch (it restarted, is"
                " another replica, or nobody polled it for a while), or it never gave that"
                " cursor: wait for its runs another way.",
                body="Error",
            ),
            422: _MALFORMED,
        },
    ),
    Endpoint(
        method="GET",
        path="/runs",
        handler="list_runs",
        roles=ADMIN_ONLY,
        operation_id="listRuns",
        summary="List runs, newest first, without payloads",
        params=(STATE, TASK_KEY, TAG, LIMIT, OFFSET),
        replies={200: Reply(description="A page of runs", body="RunList"), 422: _MALFORMED},
    ),
    Endpoint(
        method="POST",
        path="/runs/wait",
        handler="wait_runs",
        roles=_SUBMIT,
        operation_id="waitRuns",
        summary="Wait until all (or the first) of the given runs have ended",
        body="WaitRequest",
        replies={
            200: Reply(
                description="The ended runs among `ids` (empty after the timeout)", body="RunList"
            ),
            404: Reply(description="One of `ids` names no run.", body="Error"),
            422: _MALFORMED,
            **_BODY_LIMITS,
        },
    ),
    Endpoint(
        method="GET",
        path="/runs/{run_id}",
        handler="read_run",
        roles=_SUBMIT,
        operation_id="readRun",
        summary="Read one run, with its payloads",
        params=(RUN_ID,),
        replies={200: _THE_RUN, 404: _NO_RUN, 422: _MALFORMED},
    ),
    Endpoint(
        method="GET",
        path="/runs/{run_id}/wait",
        handler="wait_run",
        roles=_SUBMIT,
        operation_id="waitRun",
        summary="Long-poll until the run ends; after `timeout` return it as it is",
        params=(RUN_ID, WAIT_TIMEOUT),
        replies={200: _THE_RUN, 404: _NO_RUN, 422: _MALFORMED},
    ),
    Endpoint(
        method="POST",
        path="/runs/{run_id}/cancel",
        handler="cancel_run",
        roles=_SUBMIT,
        operation_id="cancelRun",
        summary="Cancel a run: a queued one at once, a running one via its worker",
        params=(RUN_ID,),
        replies={
            200: Reply(description="The run, now CANCELLED or CANCELLING", body="TaskRun"),
            404: _NO_RUN,
            409: Reply(description="The run has already ended.", body="Error"),
            422: _MALFORMED,
        },
    ),
    Endpoint(
        method="GET",
        path="/runs/{run_id}/history",
        handler="run_history",
        roles=_SUBMIT,
        operation_id="readRunHistory",
        summary="The run's state changes, oldest first",
        params=(RUN_ID,),
        replies={
            200: Reply(description="The history", body="RunHistory"),
            404: _NO_RUN,
            422: _MALFORMED,
        },
    ),
    Endpoint(
        method="GET",
        path="/runs/{run_id}/logs",
        handler="run_logs",
        roles=_SUBMIT,
        operation_id="readRunLogs",
        summary="The run's log records, oldest first",
        params=(RUN_ID,),
        replies={
            200: Reply(description="The records", body="RunLogs"),
            404: _NO_RUN,
            422: _MALFORMED,
        },
    ),
    Endpoint(
        method="POST",
        path="/runs/{run_id}/retry",
        handler="retry_run",
        roles=_SUBMIT,
        operation_id="retryRun",
        summary="Queue a FAILED, CRASHED or CANCELLED run again, as a new attempt",
        params=(RUN_ID,),
        replies={
            200: Reply(description="The run, now SCHEDULED", body="TaskRun"),
            404: _NO_RUN,
            409: Reply(description="The run is not FAILED, CRASHED or CANCELLED.", body="Error"),
            422: _MALFORMED,
        },
    ),
    Endpoint(
        method="POST",
        path="/logs",
        handler="put_logs",
        roles=frozenset({Role.WORK}),
        operation_id="putLogs",
        summary="Store log records of runs (a worker sends them in batches)",
        body="LogBatch",
        replies={
            202: Reply(description="Stored", body="LogsAccepted"),
            422: _MALFORMED,
            **_BODY_LIMITS,
        },
    ),
    Endpoint(
        method="GET",
        path="/workers",
        handler="list_workers",
        roles=ADMIN_ONLY,
        operation_id="listWorkers",
        summary="The connected workers",
        replies={200: Reply(description="The workers", body="WorkerList")},
    ),
    Endpoint(
        method="GET",
        path="/tasks",
        handler="list_tasks",
        roles=ADMIN_ONLY,
        operation_id="listTasks",
        summary="Per task key: queued, running and scheduled runs, and the last hour's ends",
        replies={200: Reply(description="The task keys", body="TaskStatsList")},
    ),
    Endpoint(
        method="GET",
        path="/events",
        handler="events",
        roles=ADMIN_ONLY,
        operation_id="events",
        summary="Server-sent events: every run created or changed, and worker changes",
        replies={
            200: Reply(description="A `text/event-stream` that stays open"),
            503: Reply(
                description="As many streams as the server holds are open; retry after"
                " `Retry-After` seconds.",
                body="Error",
            ),
        },
    ),
    Endpoint(
        method="GET",
        path="/metrics",
        handler="metrics",
        roles=ADMIN_ONLY,
        operation_id="metrics",
        summary="Metrics in the Prometheus text format",
        replies={200: Reply(description="The metrics")},
    ),
    Endpoint(
        method="POST",
        path="/blobs",
        handler="put_blob",
        roles=_SUBMIT_OR_WORK,
        operation_id="putBlob",
        summary="Store a payload blob (pickled parameters or result)",
        body=BYTES,
        replies={
            201: Reply(description="Stored", body="BlobRef"),
            **_BODY_LIMITS,
        },
    ),
    Endpoint(
        method="GET",
        path="/blobs/{blob_id}",
        handler="get_blob",
        roles=_SUBMIT_OR_WORK,
        operation_id="getBlob",
        summary="Read a payload blob",
        params=(BLOB_ID,),
        replies={
            200: Reply(description="The blob's bytes", body=BYTES),
            404: Reply(description="No such blob.", body="Error"),
        },
    ),
    Endpoint(
        method="GET",
        path="/openapi.json",
        handler="openapi",
        roles=ANY_ROLE,
        operation_id="openapi",
        summary="This document",
        replies={200: Reply(description="The OpenAPI document")},
    ),
)
