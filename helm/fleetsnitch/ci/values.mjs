// Validates the chart's values as Helm does before rendering (values.schema.json,
// JSON Schema draft-07, against the defaults merged with each values file), proves
// that the schema refuses every ci/invalid/*.values.yaml whose first line says
// `# expect-schema: MESSAGE` with that message, and that README.md documents
// every value the schema declares.
//   node values.mjs CHART_DIR OUT_DIR
// OUT_DIR holds NAME.values.json (valid variants) and invalid/NAME.values.json.
import fs from "node:fs";
import path from "node:path";
import Ajv from "ajv";

const [chart, out] = process.argv.slice(2);
const schema = JSON.parse(fs.readFileSync(path.join(chart, "values.schema.json"), "utf8"));
const validate = new Ajv({ allErrors: true, strict: true, allowUnionTypes: true }).compile(schema);
const describe = (errors) =>
  errors.map((e) => `${e.instancePath || "/"} ${e.message}` +
    (e.params?.additionalProperty ? ` (${e.params.additionalProperty})` : "")).join("; ");
let bad = 0;

for (const file of fs.readdirSync(out).filter((f) => f.endsWith(".values.json")).sort()) {
  const values = JSON.parse(fs.readFileSync(path.join(out, file), "utf8"));
  if (validate(values)) console.log(`values ok: ${file}`);
  else { console.log(`values INVALID: ${file}: ${describe(validate.errors)}`); bad++; }
}

const invalidDir = path.join(chart, "ci", "invalid");
for (const file of fs.readdirSync(invalidDir).filter((f) => f.endsWith(".values.yaml")).sort()) {
  const expect = fs.readFileSync(path.join(invalidDir, file), "utf8").match(/^# expect-schema: (.+)$/m);
  if (!expect) continue; // a template failure case (`# expect-render:`), checked by check.sh
  const json = path.join(out, "invalid", file.replace(/\.yaml$/, ".json"));
  const values = JSON.parse(fs.readFileSync(json, "utf8"));
  if (validate(values)) { console.log(`values ACCEPTED but must be refused: invalid/${file}`); bad++; continue; }
  const message = describe(validate.errors);
  if (message.includes(expect[1])) console.log(`values refused as expected: invalid/${file}: ${expect[1]}`);
  else { console.log(`values refused for another reason: invalid/${file}: expected "${expect[1]}", got: ${message}`); bad++; }
}

// Every declared value (down to the objects the chart defines itself) has a row.
const readme = fs.readFileSync(path.join(chart, "README.md"), "utf8");
const declared = [];
(function walk(node, prefix) {
  for (const [key, sub] of Object.entries(node.properties ?? {})) {
    if (!prefix && key === "global") continue;
    const name = prefix ? `${prefix}.${key}` : key;
    if (sub.properties && sub.additionalProperties === false) walk(sub, name);
    else declared.push(name);
  }
})(schema, "");
const missing = declared.filter((name) => !readme.includes("| `" + name + "` |"));
if (missing.length) { console.log(`README.md has no row for: ${missing.join(", ")}`); bad++; }
else console.log(`README.md documents all ${declared.length} values`);
process.exit(bad ? 1 : 0);
