-- Login sessions of airlockd (host/src/session), so that a restarted
-- airlockd carries on each one or ends it with a reason. Valid on both
-- SQLite and PostgreSQL: BIGINT milliseconds and flags.
CREATE TABLE login_sessions (
    id            TEXT   NOT NULL PRIMARY KEY,
    user_id       TEXT   NOT NULL,
    state         TEXT   NOT NULL,
    -- 1 once the session can change no more.
    ended         BIGINT NOT NULL,
    -- The session as the API shows it (JSON): steps, VM ids, credential
    -- record id. Nothing secret: no credential, no viewer token.
    view          TEXT   NOT NULL,
    -- Its viewer tokens still valid, as SHA-256 digests with expiries
    -- (JSON), so that its viewer links work after a restart.
    viewer_tokens TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE INDEX login_sessions_ended ON login_sessions (ended, updated_at_ms);

-- The session whose login produced a credential record: a browser VM
-- hands its credential over at least once, and a repeat after a restart
-- must find the record stored the first time instead of adding another.
ALTER TABLE credential_records ADD COLUMN session_id TEXT;
CREATE UNIQUE INDEX credential_records_session ON credential_records (session_id);
