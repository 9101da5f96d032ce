"""Everything that speaks psycopg: the pool and the named queries, migrations, the embedded
PostgreSQL, the LISTEN connection. Callers get reactor errors and plain data, never psycopg types."""
