"""Mock data for the Cruddur-like home feed.

What this module is for: the activities ``GET /api/activities/home`` answers,
as a pure function of the current time (passed in, so tests are exact), in the
shape the original Cruddur ``home_activities`` service returned.

What it is not for: storage or anything per user. There is no database; every
caller sees the same five activities, dated relative to ``now``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

#: The demo user of the original Cruddur app, used as ``app.user_id`` when a
#: request does not name a user.
DEMO_USER_ID = "andrewbrown"


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def home_activities(now: datetime) -> list[dict[str, Any]]:
    """Five activities, newest first, with timestamps relative to ``now``.

    ``now`` should be timezone-aware (UTC) so every timestamp carries its
    offset (ISO 8601 with ``+00:00``).
    """
    parent_uuid = "68f126b0-1ceb-4a33-88be-d90fa7109eee"
    return [
        {
            "uuid": "248959df-3079-4947-b847-9e0892d1bab4",
            "handle": "garek",
            "display_name": "Garek",
            "message": "My dear doctor, I am just a simple tailor.",
            "created_at": _iso(now - timedelta(hours=1)),
            "expires_at": _iso(now + timedelta(hours=12)),
            "likes_count": 0,
            "replies_count": 0,
            "reposts_count": 0,
            "replies": [],
        },
        {
            "uuid": "b2b4a8c7-5e2f-4a57-9d2b-1f3c6b7e9a10",
            "handle": "sisko",
            "display_name": "Benjamin Sisko",
            "message": "It's easy to be a saint in paradise.",
            "created_at": _iso(now - timedelta(hours=5)),
            "expires_at": _iso(now + timedelta(days=1)),
            "likes_count": 12,
            "replies_count": 0,
            "reposts_count": 3,
            "replies": [],
        },
        {
            "uuid": parent_uuid,
            "handle": "andrewbrown",
            "display_name": "Andrew Brown",
            "message": "Cloud is very fun!",
            "created_at": _iso(now - timedelta(days=2)),
            "expires_at": _iso(now + timedelta(days=5)),
            "likes_count": 5,
            "replies_count": 1,
            "reposts_count": 0,
            "replies": [
                {
                    "uuid": "26e12864-1c26-5c3a-9658-97a10f8fea67",
                    "reply_to_activity_uuid": parent_uuid,
                    "handle": "worf",
                    "display_name": "Worf",
                    "message": "This post has no honor!",
                    "created_at": _iso(now - timedelta(days=2) + timedelta(minutes=7)),
                    "likes_count": 0,
                    "replies_count": 0,
                    "reposts_count": 0,
                }
            ],
        },
        {
            "uuid": "c9d0e1f2-3a4b-4c5d-8e6f-7a8b9c0d1e2f",
            "handle": "kira",
            "display_name": "Kira Nerys",
            "message": "The wormhole is open again; tracing the station's latency.",
            "created_at": _iso(now - timedelta(days=3)),
            "expires_at": _iso(now + timedelta(days=4)),
            "likes_count": 2,
            "replies_count": 0,
            "reposts_count": 1,
            "replies": [],
        },
        {
            "uuid": "66e12864-8c26-4c3a-9658-95a10f8fea67",
            "handle": "worf",
            "display_name": "Worf",
            "message": "I am out of prune juice.",
            "created_at": _iso(now - timedelta(days=7)),
            "expires_at": _iso(now + timedelta(days=9)),
            "likes_count": 0,
            "replies_count": 0,
            "reposts_count": 0,
            "replies": [],
        },
    ]
