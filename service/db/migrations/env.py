"""Alembic environment: runs on the connection handed over by ``Database.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from service.db.models import Base

__all__: list[str] = []

target_metadata = Base.metadata


def _in_alembic() -> bool:
    """Whether Alembic is running this file (it is also imported plainly, e.g. by tests)."""
    try:
        context.config  # noqa: B018 - the proxy raises NameError outside a migration run
    except NameError:
        return False
    return True


def run_migrations() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:  # `alembic` command line: -x url=...
        url = context.get_x_argument(as_dictionary=True).get("url", "sqlite:///trtforge.db")
        with create_engine(url).begin() as conn:
            context.configure(
                connection=conn, target_metadata=target_metadata, render_as_batch=True
            )
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if _in_alembic():
    run_migrations()
