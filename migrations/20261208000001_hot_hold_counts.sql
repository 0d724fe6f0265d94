-- A worker rewrites counted_completion_tokens, chunks, over_signalled and
-- last_event_at of an open hold once per batch that carries its chunks.
-- While no index covers those columns, PostgreSQL can write the new row
-- version on the same page and leave every index untouched (a heap-only
-- tuple update). The expiry sweep reads open holds through
-- holds_by_user_open and sorts the few that are idle.
DROP INDEX holds_open_by_idle;

-- Room on each page for the new versions of its rows.
ALTER TABLE holds SET (fillfactor = 80);
