-- Encrypted credential records of airlockd's credential store
-- (host/src/store). One row per stored version of (user_id, provider).
-- Valid on both SQLite and PostgreSQL: BIGINT milliseconds, BYTEA blobs
-- (SQLite keeps a bound blob as a blob whatever the declared type).
CREATE TABLE credential_records (
    id              TEXT   NOT NULL PRIMARY KEY,
    user_id         TEXT   NOT NULL,
    provider        TEXT   NOT NULL,
    -- 1, 2, 3 ... per (user_id, provider); the highest is the newest.
    version         BIGINT NOT NULL,
    -- Id of the key (in the key file) that encrypted this record.
    key_id          TEXT   NOT NULL,
    -- 96-bit AES-GCM nonce, fresh and random per record.
    nonce           BYTEA  NOT NULL,
    -- AES-256-GCM ciphertext of the bundle's JSON, then the 16-byte tag.
    ciphertext      BYTEA  NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    delivered_at_ms BIGINT,
    delivered_vm    TEXT
);

-- Finds the newest record of (user_id, provider), and makes concurrent
-- writers of the same pair take distinct versions.
CREATE UNIQUE INDEX credential_records_newest
    ON credential_records (user_id, provider, version DESC);
