// Copies the onnxruntime-web files the page needs (WASM backend only) into the server's static/vendor folder.
// Run by `npm run build` (or `make -C web`); the folder is git-ignored and the server works without it.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "node_modules", "onnxruntime-web", "dist");
const out = join(here, "..", "medsam_rt", "tools", "serve", "static", "vendor");
const files = ["ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"];
const version = JSON.parse(readFileSync(join(here, "node_modules", "onnxruntime-web", "package.json"))).version;

mkdirSync(out, { recursive: true });
for (const f of files) copyFileSync(join(dist, f), join(out, f));
writeFileSync(join(out, "VERSION.json"), JSON.stringify({ "onnxruntime-web": version, files }, null, 1) + "\n");
console.log(`onnxruntime-web ${version}: ${files.length} files -> ${out}`);
