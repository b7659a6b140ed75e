-- Card keys were sealed with only their SKU as associated data, so a sealed value copied into
-- another row of the SKU opened there. They are now sealed with their row's keyed hash bound
-- in too. The rows sealed the old way are marked here and re-sealed when an agent next opens
-- the ledger (agent/keybox.py), batch by batch, the mark cleared as each row is done.
ALTER TABLE card_keys ADD COLUMN sku_bound_seal INTEGER;
UPDATE card_keys SET sku_bound_seal = 1;
CREATE INDEX card_keys_sku_bound_seal ON card_keys (id) WHERE sku_bound_seal IS NOT NULL;
