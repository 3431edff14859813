// The shared conformance fixtures (sdk/conformance), checked against the JSON Schema the
// types are generated from; the Python tests check the same files with the pydantic models.
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";

import { Ajv2020 } from "ajv/dist/2020.js";

const here = dirname(fileURLToPath(import.meta.url));
const packageRoot = join(here, "..", "..", "..");
const fixtures = join(packageRoot, "..", "conformance");
const schema = JSON.parse(readFileSync(join(packageRoot, "schema", "claudecluster.schema.json"), "utf8"));
const MODELS: Record<string, string> = {
  plan: "Plan",
  settings: "WorkerSettings",
  report: "RunReport",
  progress: "ProgressEvent",
};

const ajv = new Ajv2020({ strict: false, allErrors: true });
ajv.addSchema(schema);

function validator(file: string) {
  const model = MODELS[file.split("-")[0] ?? ""];
  assert.ok(model, `${file}: its name does not start with a known model`);
  const validate = ajv.getSchema(`${schema.$id}#/$defs/${model}`);
  assert.ok(validate, `no ${model} in the schema`);
  return validate;
}

function files(kind: "valid" | "invalid"): string[] {
  return readdirSync(join(fixtures, kind)).filter((f) => f.endsWith(".json")).sort();
}

describe("conformance fixtures", () => {
  for (const file of files("valid")) {
    it(`accepts valid/${file}`, () => {
      const validate = validator(file);
      const ok = validate(JSON.parse(readFileSync(join(fixtures, "valid", file), "utf8")));
      assert.ok(ok, JSON.stringify(validate.errors, null, 2));
    });
  }
  for (const file of files("invalid")) {
    it(`refuses invalid/${file}`, () => {
      assert.equal(validator(file)(JSON.parse(readFileSync(join(fixtures, "invalid", file), "utf8"))), false);
    });
  }
  it("covers every model both ways", () => {
    for (const kind of ["valid", "invalid"] as const) {
      assert.deepEqual(new Set(files(kind).map((f) => f.split("-")[0])), new Set(Object.keys(MODELS)), kind);
    }
  });
});
