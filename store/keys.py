"""Bearer API keys. Only a sha256 of each key is stored; keys are 256-bit random, so no slow hash is needed.

A key works until it is revoked or expires; revoked keys stay listed, so who held access stays on record.
"""
import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from store.ids import new_id
from store.models import ApiKey, utcnow

KEY_PREFIX = "tvf_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, owner: str, name: str = "", expires_in: timedelta | None = None) -> str:
    """Store a new key for owner and return it; it cannot be read back later."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + expires_in if expires_in is not None else None
    session.add(ApiKey(id=new_id("key"), owner=owner, name=name, key_hash=hash_key(key), expires_at=expires_at))
    return key


# Key's row while it is neither revoked nor expired; bound with live_key_params. Built once: the route clients
# poll runs it with every request, and building the expression cost more than running it.
LIVE_KEY = and_(ApiKey.__table__.c.key_hash == bindparam("key_hash"), ApiKey.__table__.c.revoked_at.is_(None),
                or_(ApiKey.__table__.c.expires_at.is_(None), ApiKey.__table__.c.expires_at > bindparam("now")))


def live_key_params(key: str, now: datetime | None = None) -> dict:
    return {"key_hash": hash_key(key), "now": now or utcnow()}


def owner_for_key(session: Session, key: str, now: datetime | None = None) -> str | None:
    """The owner of a key that is neither revoked nor expired; None otherwise."""
    return session.scalar(select(ApiKey.owner).where(LIVE_KEY), live_key_params(key, now))


def revoke_key(session: Session, key_id: str) -> bool:
    """Revoke a key by its id (never by its secret); False when no such live key."""
    return session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                           .values(revoked_at=utcnow())).rowcount == 1


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    return list(session.scalars(query.where(ApiKey.owner == owner) if owner else query))
