-- SMART Backend Services registrations: a client's public keys (inline JWKS or its URL), the
-- scopes it is pre-authorised for (NULL: full access to its tenant) and its token lifetime.
-- Global like clients (credentials name the tenant).
CREATE TABLE client_registrations (
    client_id text PRIMARY KEY REFERENCES clients (client_id),
    jwks text,
    jwks_url text,
    scopes text,
    token_ttl_seconds integer
);

-- Client assertion ids seen (a jti is never accepted twice within its lifetime), kept until the
-- assertion expires; shared by every instance.
CREATE TABLE assertion_jtis (
    tenant_id bigint NOT NULL,
    client_id text NOT NULL,
    jti text NOT NULL,
    expires bigint NOT NULL,
    PRIMARY KEY (tenant_id, client_id, jti)
);
CREATE INDEX assertion_jtis_by_expiry ON assertion_jtis (tenant_id, expires);
