// Validate one .glb with the Khronos glTF validator and print its JSON report on stdout.
// Usage: node validate.js FILE.glb   (exit 0 when the report was produced, 1 when it could not be)
"use strict";
const fs = require("fs");
const path = require("path");
const validator = require("gltf-validator");

async function main() {
  const file = process.argv[2];
  if (!file) {
    console.error("usage: node validate.js FILE.glb");
    process.exit(1);
  }
  const bytes = new Uint8Array(fs.readFileSync(file));
  const report = await validator.validateBytes(bytes, {
    uri: path.basename(file),
    maxIssues: 100,
    // A self-contained GLB needs no external files; refuse any it asks for.
    externalResourceFunction: (uri) => Promise.reject(new Error(`unexpected external resource ${uri}`)),
  });
  process.stdout.write(JSON.stringify(report, null, 2) + "\n");
}

main().catch((error) => {
  console.error(error.message || String(error));
  process.exit(1);
});
