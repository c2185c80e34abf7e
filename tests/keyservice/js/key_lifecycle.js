// The official Azure Key Vault SDK for JavaScript (@azure/keyvault-keys with
// @azure/identity's ClientSecretCredential), unchanged, against the key service:
// create, get, list, wrap/unwrap, delete, recover, backup/restore, and the refusals. Driven by test_ks_azure_js_sdk.py, which
// passes the settings as JSON in argv[2] and reads one JSON line of results from stdout.
// The CA is trusted through NODE_EXTRA_CA_CERTS, as a user would do it.
"use strict";

const dns = require("node:dns");
const { ClientSecretCredential } = require("@azure/identity");
const { KeyClient, CryptographyClient } = require("@azure/keyvault-keys");

const cfg = JSON.parse(process.argv[2]);

// Vault host names ({vault}.{domain}) reach 127.0.0.1 without DNS or /etc/hosts: Node's
// sockets resolve through dns.lookup, so answering for the test domain there keeps the
// name in the URL, the Host header, SNI and the certificate check (what a wildcard DNS
// record does in a real deployment; docs/operations.md).
const systemLookup = dns.lookup;
dns.lookup = function (hostname, options, callback) {
  if (typeof options === "function") {
    callback = options;
    options = {};
  }
  if (hostname === cfg.domain || hostname.endsWith("." + cfg.domain)) {
    const address = { address: "127.0.0.1", family: 4 };
    return process.nextTick(() =>
      options && options.all ? callback(null, [address]) : callback(null, address.address, 4));
  }
  return systemLookup.call(dns, hostname, options, callback);
};

async function main() {
  const credential = new ClientSecretCredential(cfg.tenantId, cfg.clientId, cfg.clientSecret, {
    authorityHost: cfg.authority,
    disableInstanceDiscovery: true,
  });
  const client = new KeyClient(cfg.vaultUrl, credential);
  const out = {};

  const created = await client.createRsaKey("js-key", { keySize: 2048 });
  out.created = { id: created.id, kty: created.keyType, nBytes: created.key.n.length,
                  enabled: created.properties.enabled,
                  recoveryLevel: created.properties.recoveryLevel };
  const rotated = await client.rotateKey("js-key");
  await client.createRsaKey("js-other", { keySize: 2048 });
  out.latest = (await client.getKey("js-key")).id;
  out.byVersion = (await client.getKey("js-key", { version: created.properties.version })).id;
  out.rotated = rotated.id;

  const names = [];
  for await (const page of client.listPropertiesOfKeys().byPage({ maxPageSize: 1 })) {
    out.pages = (out.pages || 0) + 1;
    for (const p of page) names.push(p.name);
  }
  out.names = names;
  out.versions = [];
  for await (const p of client.listPropertiesOfKeyVersions("js-key")) out.versions.push(p.version);

  // As an identity with wrapKey/unwrapKey only: the SDK cannot read the public key to
  // wrap locally, so both operations reach the service.
  const wrapper = new ClientSecretCredential(cfg.tenantId, cfg.wrapper.clientId,
    cfg.wrapper.clientSecret, { authorityHost: cfg.authority, disableInstanceDiscovery: true });
  const crypto = new CryptographyClient(created.id, wrapper);
  const dek = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
  out.wrap = {};
  for (const alg of ["RSA-OAEP", "RSA-OAEP-256"]) {
    const wrapped = await crypto.wrapKey(alg, dek);
    const unwrapped = await crypto.unwrapKey(alg, wrapped.result);
    out.wrap[alg] = { keyID: wrapped.keyID, same: Buffer.from(unwrapped.result).equals(dek) };
  }

  const poller = await client.beginDeleteKey("js-key");
  const deleted = await poller.pollUntilDone();
  out.deleted = { recoveryId: deleted.properties.recoveryId, id: deleted.id,
                  purgeDays: (deleted.properties.scheduledPurgeDate - deleted.properties.deletedOn) / 86400000 };
  out.deletedNames = [];
  for await (const d of client.listDeletedKeys()) out.deletedNames.push(d.name);
  out.afterDelete = await refusal(() => client.getKey("js-key"));
  out.recovered = (await (await client.beginRecoverDeletedKey("js-key")).pollUntilDone()).id;

  // Refusals as the SDK's RestError, with Key Vault's codes.
  out.missing = await refusal(() => client.getKey("no-such-key"));
  const current = new CryptographyClient(out.recovered, wrapper);
  const wrappedByCurrent = (await current.wrapKey("RSA-OAEP-256", dek)).result;
  await client.updateKeyProperties("js-key", { enabled: false });
  out.disabledUnwrap = await refusal(() => current.unwrapKey("RSA-OAEP-256", wrappedByCurrent));
  await client.updateKeyProperties("js-key", { enabled: true });
  out.enabledAgain = Buffer.from((await current.unwrapKey("RSA-OAEP-256", wrappedByCurrent)).result)
    .equals(dek);
  out.noPermission = await refusal(() => new KeyClient(cfg.vaultUrl, wrapper).getKey("js-key"));
  out.hsmWithoutToken = await refusal(() => client.createRsaKey("js-hsm", { keySize: 2048, hsm: true }));
  out.oldApiVersion = await refusal(
    () => new KeyClient(cfg.vaultUrl, credential, { serviceVersion: "7.3" }).getKey("js-key"));

  // Backup, purge, restore: the same key, its version ids kept.
  const otherId = (await client.getKey("js-other")).id;
  const blob = await client.backupKey("js-other");
  await (await client.beginDeleteKey("js-other")).pollUntilDone();
  await client.purgeDeletedKey("js-other");
  out.restored = { before: otherId, after: (await client.restoreKeyBackup(blob)).id };
  out.restoreAgain = await refusal(() => client.restoreKeyBackup(blob));
  process.stdout.write(JSON.stringify(out) + "\n");
}

// What a refused call threw: the HTTP status, Key Vault's error code and inner code.
async function refusal(call) {
  try {
    await call();
    return "succeeded";
  } catch (e) {
    const error = (e.details && e.details.error) || {};
    const inner = error.innerError || error.innererror;
    return { statusCode: e.statusCode, code: e.code, inner: inner ? inner.code : null };
  }
}

main().catch((e) => {
  process.stderr.write(`${e.stack || e}\n${e.statusCode || ""} ${e.code || ""}\n`);
  process.exit(1);
});
