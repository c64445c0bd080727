// The script-tag build: dist/venus.js (an ES module with no imports) wrapped
// in a function, its exports on `window.venus`. No bundler: the module is
// one file, and this is all a bundler would do to it.
import { readFileSync, writeFileSync } from "node:fs";

const source = readFileSync(new URL("./dist/venus.js", import.meta.url), "utf8");
if (/^import /m.test(source)) {
  throw new Error("dist/venus.js imports something: the script-tag build expects one file");
}
const names = [];
const body = source
  .replace(/^export (async function|function|class|const|let) (\w+)/gm, (_, kind, name) => {
    names.push(name);
    return `${kind} ${name}`;
  })
  .replace(/^export \{([^}]*)\};?$/gm, (_, list) => {
    // `export { a, b as c }`: each name as exported.
    for (const item of list.split(",").map((x) => x.trim()).filter(Boolean)) {
      const [local, exported] = item.split(/\s+as\s+/);
      names.push(exported && exported !== local ? `${exported}: ${local}` : local);
    }
    return "";
  });
if (/^export /m.test(body)) {
  throw new Error("an export form the script-tag build does not know");
}
const iife = `/* venus browser SDK, script-tag build: window.venus */\n(function () {\n"use strict";\n${body}\nglobalThis.venus = { ${names.join(", ")} };\n})();\n`;
writeFileSync(new URL("./dist/venus.iife.js", import.meta.url), iife);
console.log(`dist/venus.iife.js: window.venus with ${names.length} names`);
