// Static checks of docker/Dockerfile and the build context .dockerignore leaves.
//   node context.mjs REPO_ROOT COPY_DIR
// Copies the context's files to COPY_DIR (for cargo metadata) and exits non-zero
// on the first kind of problem found, printing every instance of it.
import fs from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
const ignore = createRequire(import.meta.url)("@balena/dockerignore");

const [root, copyDir] = process.argv.slice(2);
const problems = [];
const read = (rel) => fs.readFileSync(path.join(root, rel), "utf8");

// Cargo.toml [workspace.package]: version, license, repository.
const cargo = read("Cargo.toml");
const section = cargo.split(/^\[workspace\.package\]$/m)[1].split(/^\[/m)[0];
const field = (name) => section.match(new RegExp(`^${name}\\s*=\\s*"([^"]*)"`, "m"))?.[1];
const workspace = { version: field("version"), license: field("license"), repository: field("repository") };

// Dockerfile instructions, continuation lines joined, comments dropped.
const instructions = read("docker/Dockerfile").replace(/\\\n/g, " ").split("\n")
  .map((l) => l.trim()).filter((l) => l && !l.startsWith("#"))
  .map((l) => { const [op, ...rest] = l.split(/\s+/); return { op: op.toUpperCase(), args: rest.join(" ") }; });
for (const from of instructions.filter((i) => i.op === "FROM")) {
  if (/bookworm|bullseye|buster|stretch/.test(from.args)) problems.push(`base image is not Debian's stable release: FROM ${from.args}`);
}
const lastFrom = instructions.map((i) => i.op).lastIndexOf("FROM");
const final = instructions.slice(lastFrom + 1);
const args = new Map(final.filter((i) => i.op === "ARG").map((i) => {
  const [name, value] = i.args.split("=");
  return [name, value];
}));
const labels = new Map();
for (const i of final.filter((i) => i.op === "LABEL")) {
  for (const m of i.args.matchAll(/([\w.-]+)="([^"]*)"/g)) labels.set(m[1], m[2]);
}
const oci = (name) => labels.get(`org.opencontainers.image.${name}`);
const expectLabel = (name, value) => {
  if (oci(name) !== value) problems.push(`LABEL org.opencontainers.image.${name} is ${JSON.stringify(oci(name))}, expected ${JSON.stringify(value)}`);
};
expectLabel("source", workspace.repository);
expectLabel("licenses", workspace.license);
for (const [name, arg] of [["version", "VERSION"], ["revision", "REVISION"], ["created", "CREATED"]]) {
  expectLabel(name, "${" + arg + "}");
  // A build argument is only in scope in the stage that declares it (after its FROM).
  if (!args.has(arg)) problems.push(`ARG ${arg} is not declared in the final stage: the ${name} label would be empty`);
}
if (args.get("VERSION") !== workspace.version) {
  problems.push(`ARG VERSION defaults to ${args.get("VERSION")}, the workspace version is ${workspace.version}`);
}

// The context: every file below the root that .dockerignore does not exclude.
const patterns = read(".dockerignore").split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
const ig = ignore().add(patterns);
const prune = !patterns.some((p) => p.startsWith("!")); // Docker prunes an excluded directory without exceptions
const context = [];
(function walk(rel) {
  for (const entry of fs.readdirSync(path.join(root, rel), { withFileTypes: true })) {
    const child = rel ? `${rel}/${entry.name}` : entry.name;
    const excluded = ig.ignores(child);
    if (entry.isDirectory()) { if (!(excluded && prune)) walk(child); }
    else if (!excluded) context.push(child);
  }
})("");
const inContext = new Set(context);

// Never sent, whether or not the directories exist right now.
for (const probe of ["target/release/fleetsnitch", "exporter/target/debug/build/x", "exporter/fuzz/target/x",
  ".git/HEAD", ".git/objects/pack/x.pack", ".cache/chart-check/render", ".worktrees/chart/Cargo.toml",
  "worktrees/chart/Cargo.toml", "ebpf/bpf/fleetsnitch.bpf.o"]) {
  if (!ig.ignores(probe)) problems.push(`.dockerignore lets ${probe} into the build context`);
}
for (const file of context.filter((f) => /^(target|\.git|\.cache)\//.test(f) || f.includes("/target/"))) {
  problems.push(`in the build context: ${file}`);
}
// Always sent: every tracked file of the workspace and what COPY names.
const tracked = execFileSync("git", ["-C", root, "ls-files", "-z"], { encoding: "utf8" }).split("\0").filter(Boolean);
const needed = tracked.filter((f) => /^(Cargo\.(toml|lock)|config\.example\.yaml|(exporter|ebpf|tests)\/)/.test(f)
  && !f.startsWith("exporter/fuzz/"));
for (const i of final.concat(instructions).filter((i) => i.op === "COPY" && !i.args.includes("--from"))) {
  const sources = i.args.split(/\s+/).filter((a) => !a.startsWith("--")).slice(0, -1);
  for (const s of sources.filter((s) => s !== ".")) needed.push(s);
}
for (const file of new Set(needed)) if (!inContext.has(file)) problems.push(`missing from the build context: ${file}`);

if (problems.length) {
  for (const p of problems) console.log(`docker check: ${p}`);
  process.exit(1);
}
let bytes = 0;
for (const file of context) {
  const from = path.join(root, file);
  const to = path.join(copyDir, file);
  fs.mkdirSync(path.dirname(to), { recursive: true });
  fs.cpSync(from, to, { verbatimSymlinks: true });
  bytes += fs.lstatSync(from).size;
}
console.log(`docker check: labels and build arguments ok (version ${workspace.version}, ${workspace.license}, ${workspace.repository})`);
console.log(`docker check: build context ${context.length} files, ${(bytes / 1024).toFixed(0)} KiB; ${needed.length} needed files present`);
