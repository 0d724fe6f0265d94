-- Identifiers are compared byte by byte. Under a database collation other
-- than "C", PostgreSQL compares text through the C library's locale
-- routines, which on every primary-key probe and insert of a chunk's
-- processed id costs more than the rest of the comparison. Ids are opaque,
-- so their order has no meaning beyond being stable.
ALTER TABLE accounts ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE holds
    ALTER COLUMN user_id TYPE text COLLATE "C",
    ALTER COLUMN stream_id TYPE text COLLATE "C";
ALTER TABLE ledger ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE processed_messages
    ALTER COLUMN user_id TYPE text COLLATE "C",
    ALTER COLUMN message_id TYPE text COLLATE "C";
