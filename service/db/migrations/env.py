"""Alembic environment: runs on the connection handed over by ``Database.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from service.db.models import Base

__all__: list[str] = []

target_metadata = Base.metadata


def include_name(name: str | None, type_: str, _parents: object) -> bool:
    """Whether Alembic manages this object: not Procrastinate's tables (and trtforge's link to
    them), which ``service.queue.procrastinate_schema.ensure_schema`` applies."""
    return not (type_ == "table" and (name or "").startswith(_NOT_ALEMBICS))


_NOT_ALEMBICS = ("procrastinate_", "trtforge_procrastinate_")


def _in_alembic() -> bool:
    """Whether Alembic is running this file (it is also imported plainly, e.g. by tests)."""
    try:
        context.config  # noqa: B018 - the proxy raises outside a migration run
    except (NameError, AttributeError):
        return False
    return True


def run_migrations() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:  # `alembic` command line: -x url=...
        url = context.get_x_argument(as_dictionary=True).get("url", "sqlite:///trtforge.db")
        with create_engine(url).begin() as conn:
            context.configure(
                connection=conn,
                target_metadata=target_metadata,
                render_as_batch=True,
                include_name=include_name,
            )
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


if _in_alembic():
    run_migrations()
