-- Accounts, holds, the ledger of balance changes, processed message ids
-- and the outbox of replies and events. Every change to these tables is
-- made in one transaction together with the message id that caused it.

CREATE TABLE accounts (
    user_id      text PRIMARY KEY,
    -- Always the sum of this user's ledger entries.
    balance      bigint NOT NULL DEFAULT 0,
    -- Always the sum of this user's open holds.
    reserved     bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    -- Always the number of this user's open holds.
    holds_open   integer NOT NULL DEFAULT 0 CHECK (holds_open >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE holds (
    reservation_id             uuid PRIMARY KEY,
    user_id                    text NOT NULL REFERENCES accounts (user_id),
    stream_id                  text NOT NULL,
    model                      text NOT NULL,
    -- The price entry used, so a later price change does not alter an
    -- open hold's settlement.
    input_per_million          bigint NOT NULL,
    output_per_million         bigint NOT NULL,
    cached_input_per_million   bigint,
    encoding                   text NOT NULL,
    reserved                   bigint NOT NULL CHECK (reserved >= 0),
    prompt_tokens              bigint NOT NULL CHECK (prompt_tokens >= 0),
    max_output_tokens          bigint NOT NULL CHECK (max_output_tokens > 0),
    counted_completion_tokens  bigint NOT NULL DEFAULT 0
                               CHECK (counted_completion_tokens >= 0),
    chunks                     bigint NOT NULL DEFAULT 0 CHECK (chunks >= 0),
    over_signalled             boolean NOT NULL DEFAULT false,
    -- Time of the last event processed for this stream, on the database
    -- clock that every worker shares; the expiry sweep measures idleness
    -- from it.
    last_event_at              timestamptz NOT NULL,
    opened_at                  timestamptz NOT NULL,
    -- NULL while the hold is open.
    settled_at                 timestamptz,
    settle_status              text CHECK (settle_status IN
                               ('completed', 'cancelled', 'failed', 'expired')),
    charged                    bigint CHECK (charged >= 0),
    -- Set once when a late stream.ended corrects an expired hold.
    adjusted_at                timestamptz,
    grant_reply                jsonb NOT NULL,
    UNIQUE (user_id, stream_id),
    CHECK ((settled_at IS NULL) = (settle_status IS NULL)),
    CHECK ((settled_at IS NULL) = (charged IS NULL)),
    CHECK (adjusted_at IS NULL OR settle_status = 'expired')
);

CREATE INDEX holds_open_by_idle ON holds (last_event_at) WHERE settled_at IS NULL;
CREATE INDEX holds_by_user_open ON holds (user_id) WHERE settled_at IS NULL;

CREATE TABLE ledger (
    entry_id       bigserial PRIMARY KEY,
    user_id        text NOT NULL REFERENCES accounts (user_id),
    kind           text NOT NULL CHECK (kind IN ('grant', 'charge', 'adjustment')),
    amount         bigint NOT NULL,
    balance_after  bigint NOT NULL,
    reservation_id uuid REFERENCES holds (reservation_id),
    message_id     text,
    reason         text,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_by_user ON ledger (user_id);
-- A hold is charged at most once and adjusted at most once.
CREATE UNIQUE INDEX ledger_one_charge_per_hold ON ledger (reservation_id, kind)
    WHERE kind IN ('charge', 'adjustment');

CREATE TABLE processed_messages (
    user_id      text NOT NULL,
    message_id   text NOT NULL,
    kind         text NOT NULL,
    -- The reply sent for a stream.started, sent again for a duplicate.
    reply        jsonb,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, message_id)
);

CREATE TABLE outbox (
    outbox_id      bigserial PRIMARY KEY,
    -- A grant's reply and its event share one event_id: they are one
    -- logical event sent to two places.
    event_id       uuid NOT NULL,
    -- 'reply' goes to the default exchange with routing key reply_to;
    -- 'event' goes to the results exchange with routing key = type.
    destination    text NOT NULL CHECK (destination IN ('reply', 'event')),
    routing_key    text NOT NULL,
    correlation_id text,
    event_type     text NOT NULL,
    reservation_id uuid,
    body           jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz
);

CREATE INDEX outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;
-- Exactly one settlement event per hold.
CREATE UNIQUE INDEX outbox_one_settlement_per_hold ON outbox (reservation_id)
    WHERE event_type = 'reservation.settled';
