// Validates an AsyncAPI document with the AsyncAPI project's own parser (the one its CLI uses).
// Exit 0 when the parser reports no error; warnings and hints are printed.
import { readFileSync } from 'node:fs';
import { Parser } from '@asyncapi/parser';

const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(process.argv[2], 'utf8'));
for (const d of diagnostics) console.log(`severity ${d.severity} ${d.code} ${d.path.join('/')}: ${d.message}`);
const errors = diagnostics.filter((d) => d.severity === 0);
if (!document || errors.length) {
  console.log(`invalid: ${errors.length} error(s)`);
  process.exit(1);
}
console.log(`valid AsyncAPI ${document.version()}: ${document.channels().length} channels, ${document.operations().length} operations`);
