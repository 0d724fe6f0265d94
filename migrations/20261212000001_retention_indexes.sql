-- The retention job deletes chunk records by age. Records arrive in time
-- order, so a block-range index finds the old ones while costing an
-- insert next to nothing, unlike a B-tree on a table that takes a row per
-- chunk.
CREATE INDEX processed_messages_by_age ON processed_messages
    USING brin (processed_at) WITH (autosummarize = on);

-- The oldest open hold bounds which chunk records may go.
CREATE INDEX holds_open_by_age ON holds (opened_at) WHERE settled_at IS NULL;
