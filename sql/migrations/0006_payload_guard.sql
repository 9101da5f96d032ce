-- 0006_payload_guard: refuse at INSERT what no renderer could use.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0006_payload_guard.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 5` (sql/rollback/0006_payload_guard.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- jobs.payload is user input (under the Supabase option any signed-in student writes it). PostgreSQL
-- accepts JSON nested about 10,000 deep and documents of up to 255 MB; Python's json decoder gives
-- up at about 1,000 levels, and no renderer can use a multi-megabyte input. So a payload is refused
-- at the door, with an error that names the field (SQLSTATE 23514, column_name = payload), when:
--   * it is larger than 262,144 bytes (256 KiB) as JSON text;
--   * it nests containers more than 64 deep (a bare {} is 1 deep);
--   * its input field (job_types.input_field) is present but not text or a number, or is text of
--     more than 4,000 characters;
--   * style, length or voice is present but not non-empty text of at most 64 characters.
-- A missing or empty input field is still accepted here and fails the job with INVALID_INPUT when
-- it is dispatched, as before. created_at must be a finite time (infinity cannot be read back by
-- most clients, the reactor's among them).
-- Rows written before this migration are not checked: the reactor applies the same limits when it
-- claims them, and fails such a job alone (INVALID_INPUT), never the reactor.

CREATE FUNCTION reactor.payload_problem(p_payload jsonb, p_input_field text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    size   integer;
    v      jsonb;
    k      text;
BEGIN
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RETURN NULL;  -- jobs_before_write says what is wrong with that
    END IF;
    size := octet_length(p_payload::text);
    IF size > 262144 THEN
        RETURN format('jobs.payload is %s bytes as JSON text; at most 262144 (256 KiB)', size);
    END IF;
    -- an object or array at level 64 of the document (the document itself is level 0) is the 65th
    -- container down; the path stops descending there
    IF jsonb_path_exists(p_payload, 'strict $.**{64} ? (@.type() == "object" || @.type() == "array")') THEN
        RETURN 'jobs.payload is nested more than 64 levels deep';
    END IF;
    IF p_input_field IS NOT NULL THEN
        v := p_payload -> p_input_field;
        IF v IS NOT NULL AND jsonb_typeof(v) NOT IN ('string', 'number', 'null') THEN
            RETURN format('jobs.payload.%s must be text, got %s', p_input_field, jsonb_typeof(v));
        END IF;
        IF jsonb_typeof(v) = 'string' AND length(v #>> '{}') > 4000 THEN
            RETURN format('jobs.payload.%s is %s characters; at most 4000', p_input_field, length(v #>> '{}'));
        END IF;
    END IF;
    FOREACH k IN ARRAY ARRAY['style', 'length', 'voice'] LOOP
        v := p_payload -> k;
        IF v IS NOT NULL AND (jsonb_typeof(v) <> 'string' OR btrim(v #>> '{}') = ''
                              OR length(v #>> '{}') > 64) THEN
            RETURN format('jobs.payload.%s must be non-empty text of at most 64 characters, got %s',
                          k, CASE WHEN jsonb_typeof(v) = 'string' THEN format('%s characters', length(v #>> '{}'))
                                  ELSE jsonb_typeof(v) END);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION reactor.payload_problem(jsonb, text) IS
    'Why a job payload can never render (NULL: it may). Checked on INSERT and on UPDATE of payload.';

CREATE FUNCTION reactor.jobs_payload_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    problem text;
BEGIN
    IF NEW.created_at IS NOT NULL AND NOT isfinite(NEW.created_at) THEN
        RAISE EXCEPTION 'jobs.created_at must be a finite time, got %', NEW.created_at
            USING ERRCODE = 'check_violation', COLUMN = 'created_at', TABLE = 'jobs';
    END IF;
    problem := reactor.payload_problem(
        NEW.payload, (SELECT t.input_field FROM public.job_types t WHERE t.name = NEW.job_type));
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem
            USING ERRCODE = 'check_violation', COLUMN = 'payload', TABLE = 'jobs';
    END IF;
    RETURN NEW;
END
$$;

-- after jobs_before_write (triggers fire in name order), which checks job_type and the payload's type
CREATE TRIGGER jobs_payload_guard_insert
    BEFORE INSERT ON reactor.jobs
    FOR EACH ROW EXECUTE FUNCTION reactor.jobs_payload_guard();
CREATE TRIGGER jobs_payload_guard_update
    BEFORE UPDATE OF payload, job_type, created_at ON reactor.jobs
    FOR EACH ROW
    WHEN (NEW.payload IS DISTINCT FROM OLD.payload OR NEW.job_type IS DISTINCT FROM OLD.job_type
          OR NEW.created_at IS DISTINCT FROM OLD.created_at)
    EXECUTE FUNCTION reactor.jobs_payload_guard();

INSERT INTO reactor.schema_migrations (version, name) VALUES (6, 'payload_guard');
