-- Holds that grow while their stream runs, and holds sized from the
-- completions that users and models produced before. Every change is
-- additive: existing columns keep their meaning.

ALTER TABLE holds
    -- The hold as granted; `reserved` grows past it when the stream's
    -- counted usage nears the hold.
    ADD COLUMN initial_reserved   bigint CHECK (initial_reserved >= 0),
    -- Number of times the hold grew.
    ADD COLUMN extensions         integer NOT NULL DEFAULT 0 CHECK (extensions >= 0),
    -- How the output allowance was chosen; NULL for holds granted before
    -- this column existed.
    ADD COLUMN sized_by           text CHECK (sized_by IN
                                  ('max_output_tokens', 'user_history', 'model_history',
                                   'model_default')),
    -- Completion tokens the hold was settled at (the provider's count when
    -- the end carried one, else the worker's); NULL while open.
    ADD COLUMN completion_tokens  bigint CHECK (completion_tokens >= 0);

UPDATE holds SET initial_reserved = reserved;
ALTER TABLE holds ALTER COLUMN initial_reserved SET NOT NULL;

-- Settled holds take their completion tokens from their settlement event.
UPDATE holds h SET completion_tokens = (o.body ->> 'completion_tokens')::bigint
FROM outbox o
WHERE o.reservation_id = h.reservation_id
  AND o.event_type = 'reservation.settled'
  AND o.destination = 'event';

-- Recent completed streams of one user and of one model, newest first,
-- for sizing a hold and for estimating when a stream slot frees up. The
-- included columns let both reads use index-only scans.
CREATE INDEX holds_history_by_user ON holds (user_id, settled_at DESC)
    INCLUDE (completion_tokens, opened_at)
    WHERE settle_status = 'completed' AND completion_tokens IS NOT NULL;
CREATE INDEX holds_history_by_model ON holds (model, settled_at DESC)
    INCLUDE (completion_tokens, opened_at)
    WHERE settle_status = 'completed' AND completion_tokens IS NOT NULL;
