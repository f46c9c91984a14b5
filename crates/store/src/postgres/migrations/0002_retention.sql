-- History retention: history before `horizon` (micros) has been pruned, so `_since` exports
-- before it are refused. One row, written by the first prune; it never moves back.
CREATE TABLE retention (
    id integer PRIMARY KEY CHECK (id = 0),
    horizon bigint NOT NULL
);
