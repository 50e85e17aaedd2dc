import t from 'tap';
import crypto from 'node:crypto';
import { SecretStore } from '../../lib/core/secrets';

function encrypt(key: Buffer, iv: Buffer, plain: string): string {
  const c = crypto.createCipheriv('aes-256-cbc', key, iv); // PKCS#7 padding, as qemu expects
  return Buffer.concat([c.update(plain), c.final()]).toString('base64');
}

t.test('encrypted secrets (keyid=, iv=) decrypt as qemu does', async (t) => {
  const key = crypto.randomBytes(32);
  const iv = crypto.randomBytes(16);
  for (const plain of ['hunter2', 'sixteen bytes!!!', 'x']) {
    const s = new SecretStore();
    s.addObject(`secret,id=mk,data=${key.toString('base64')},format=base64`);
    s.addObject(`secret,id=sec0,data=${encrypt(key, iv, plain)},format=base64,keyid=mk,iv=${iv.toString('base64')}`);
    t.equal(s.get('sec0').toString(), plain, JSON.stringify(plain));
  }
});

t.test('encrypted secrets: bad inputs are one-line errors', async (t) => {
  const key = crypto.randomBytes(32);
  const iv = crypto.randomBytes(16);
  const ct = encrypt(key, iv, 'hunter2');
  const kind = (objs: string[]): string => {
    const s = new SecretStore();
    try {
      for (const o of objs) s.addObject(o);
      const v = s.get('sec0');
      return v.toString() === 'hunter2' ? 'ok' : 'wrong-plaintext';
    } catch (e) {
      return (e as { kind: string }).kind;
    }
  };
  const mk = `secret,id=mk,data=${key.toString('base64')},format=base64`;
  t.equal(kind([mk, `secret,id=sec0,data=${ct},format=base64,keyid=mk,iv=${iv.toString('base64')}`]), 'ok');
  t.equal(kind([mk, `secret,id=sec0,data=${ct},format=base64,keyid=mk`]), 'usage', 'missing iv');
  t.equal(kind([mk, `secret,id=sec0,data=${ct},format=base64,keyid=nosuch,iv=${iv.toString('base64')}`]), 'crypto', 'unknown master key');
  t.equal(kind([`secret,id=mk,data=short`, `secret,id=sec0,data=${ct},format=base64,keyid=mk,iv=${iv.toString('base64')}`]), 'crypto', 'master key not 32 bytes');
  t.equal(kind([mk, `secret,id=sec0,data=${ct},keyid=mk,iv=${iv.toString('base64')}`]), 'crypto', 'format=raw: base64 text is not ciphertext');
  t.equal(kind([mk, `secret,id=sec0,data=${ct},format=base64,keyid=sec0,iv=${iv.toString('base64')}`]), 'usage', 'self reference');
  const other = `secret,id=mk,data=${crypto.randomBytes(32).toString('base64')},format=base64`;
  t.not(kind([other, `secret,id=sec0,data=${ct},format=base64,keyid=mk,iv=${iv.toString('base64')}`]), 'ok', 'wrong master key never yields the passphrase');
});

t.test('secrets are not in the serialised form twice and never in an error message', async (t) => {
  const s = new SecretStore();
  s.addObject('secret,id=sec0,data=topsecret');
  t.throws(() => s.get('nosuch'), /nosuch/);
  try { s.get('nosuch'); } catch (e) { t.notMatch((e as Error).message, /topsecret/); }
});
