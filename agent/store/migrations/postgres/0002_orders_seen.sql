-- The sales forecast reads recent demand by time: without this it scanned every order ever
-- taken in, on each run.
CREATE INDEX orders_seen ON orders (seen_at);
