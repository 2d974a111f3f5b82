#!/usr/bin/env node
'use strict';
/*
 * Runs an HTML page the way a browser would, in jsdom: its scripts run, pusher-js's web build
 * (from js.pusher.com in the page) is served from node_modules, and the page's console goes to
 * stdout. Usage: node browser.js PAGE.html ORIGIN   (ORIGIN: the URL the page is served from,
 * so relative URLs such as an auth endpoint resolve against it).
 */
const fs = require('fs');
const path = require('path');
const { JSDOM, ResourceLoader, VirtualConsole } = require('jsdom');

const [pagePath, origin] = process.argv.slice(2);
const WEB = path.join(__dirname, 'node_modules', 'pusher-js', 'dist', 'web');
const CDN = /^https:\/\/js\.pusher\.com\/[0-9.]+\/(pusher(?:-with-encryption)?(?:\.min)?\.js)$/;

class Loader extends ResourceLoader {
  fetch(url, options) {
    const found = CDN.exec(url);
    if (found) return Promise.resolve(fs.readFileSync(path.join(WEB, found[1])));
    return super.fetch(url, options);
  }
}

const virtualConsole = new VirtualConsole();
virtualConsole.on('log', (...args) => console.log(...args));
virtualConsole.on('error', (...args) => console.error(...args));
virtualConsole.on('jsdomError', (err) => console.error('jsdom:', err.message));
new JSDOM(fs.readFileSync(pagePath, 'utf8'), {
  url: origin, runScripts: 'dangerously', resources: new Loader(), virtualConsole,
});
